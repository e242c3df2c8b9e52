"""benchmarks/gpu_check.py runs end to end on the CPU with --small and reports every section."""

import importlib.util
import json
from pathlib import Path

import pytest

_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # 46 s on 2 loaded cores, compilation cache cold (five train-step compiles); 13-21 s warm
def test_small_run_on_cpu_reports_every_section(gpu_check, capsys):
    result = gpu_check.main(["--small", "--warmup", "0", "--reps", "1", "--sync-steps", "2"])

    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[-1]) == result  # the last stdout line is the whole result
    assert any(line.startswith("| dit_train | passed |") for line in out)  # the markdown table
    sections = result["sections"]
    assert set(sections) == {"dit_train", "unet_train_float32", "unet_train_bfloat16", "attention", "host_sync", "env"}
    assert result["ok"] and result["size"] == "small" and sections["env"]["backend"] == "cpu"
    for name in ("dit_train", "unet_train_float32", "unet_train_bfloat16", "host_sync"):
        assert sections[name]["status"] == "passed", (name, sections[name])
        assert sections[name]["images_per_s"] > 0, name
    dit = sections["dit_train"]
    assert dit["model"] == "DiT-S/2" and dit["flops_per_step"] > 0 and dit["compile_s"] > 0
    assert dit["mfu"] is None and "cpu" in dit["mfu_reason"] and dit["meets_target"] is None
    attention = sections["attention"]
    assert attention["status"] in ("passed", "not applicable (backend cpu)")
    assert attention["xla_path_compiled"] and not attention["default_uses_cudnn"]
    host_sync = sections["host_sync"]
    assert host_sync["host_ops_in_step"] == [] and host_sync["steps"] == 2


def test_peak_by_device_kind(gpu_check):
    peak = gpu_check.peak_flops
    assert peak("NVIDIA H100 80GB HBM3", "gpu", None)[0] == 989e12
    assert peak("NVIDIA H100 PCIe", "gpu", None)[0] == 756e12
    assert peak("NVIDIA H200", "gpu", None)[0] == 989e12
    assert peak("NVIDIA L40S", "gpu", None)[0] == 362e12  # not the L4's
    assert peak("TPU v5 lite", "tpu", None)[0] == 197e12
    assert peak("cpu", "cpu", None)[0] is None
    assert peak("cpu", "cpu", 2.0) == (2e12, "--peak-tflops")
