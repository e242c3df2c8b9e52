"""Shared by the multi-process tests (test_multihost.py, test_slurm.py): the short Swiss-roll run,
how it is started as local processes, and how two runs' checkpoints are compared."""

import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import jax
import numpy as np
import orbax.checkpoint as ocp

REPO = Path(__file__).resolve().parent.parent


def load_launcher() -> ModuleType:
    """launch/local.py as a module (launch/ is no package)."""
    spec = importlib.util.spec_from_file_location("launch_local", REPO / "launch" / "local.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_flags(steps: int) -> list[str]:
    """diffusion_jax.main's flags for a `steps`-step Swiss-roll run (no --workdir): a checkpoint half-way
    and at the end, samples once at the end in two batches (generate() gathers each one)."""
    return [
        "--config=configs/ddpm_swissroll.py",
        f"--config.training.num_steps={steps}",
        "--config.training.batch_size=64",
        "--config.training.log_every=5",
        f"--config.training.checkpoint_every={steps // 2}",
        "--config.training.sample_every=0",  # samples once, at the last step
        "--config.optim.warmup_steps=2",
        "--config.sample.steps=10",
        "--config.sample.num_samples=64",
        "--config.sample.batch_size=32",
    ]


def cache_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """`environ` (default os.environ) with the tests' shared persistent compilation cache: the
    subprocess runs of the same program then compile it once."""
    cache = os.path.join(tempfile.gettempdir(), "diffusion_jax_test_xla_cache")
    return dict(os.environ if environ is None else environ) | {
        "JAX_COMPILATION_CACHE_DIR": cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5",
    }


def launch_local(workdir: Path, num_processes: int, devices: int, flags: list[str]) -> subprocess.Popen:
    """`launch/local.py` running `flags` as `num_processes` processes of `devices` CPU devices each."""
    return subprocess.Popen(
        [sys.executable, "launch/local.py", f"--num_processes={num_processes}", f"--devices_per_process={devices}",
         "--", *flags, f"--workdir={workdir}", "--initialization_timeout=120"],
        cwd=REPO, env=cache_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def saved_state(workdir: Path, step: int) -> dict[str, np.ndarray]:
    """Every array of a checkpoint as NumPy, read without a mesh (the saver's may span several processes)."""
    path = workdir / "checkpoints" / str(step) / "state"
    checkpointer = ocp.PyTreeCheckpointer()
    metadata = checkpointer.metadata(path).item_metadata
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
    state = checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}


def assert_same_training(a: Path, b: Path, step: int) -> None:
    """The checkpoints of `step` in workdirs `a` and `b` hold the same arrays (to float rounding: a mesh
    split over processes reduces in another order), and so do the samples written at that step."""
    state_a, state_b = saved_state(a, step), saved_state(b, step)
    assert state_a.keys() == state_b.keys() and len(state_a) > 20
    for key in state_a:
        np.testing.assert_allclose(state_a[key], state_b[key], rtol=1e-5, atol=1e-5, err_msg=key)
    samples = [np.load(w / "samples" / f"samples_{step}.npz")["arr_0"] for w in (a, b)]
    assert samples[0].shape == (64, 2)
    np.testing.assert_allclose(samples[0], samples[1], rtol=1e-4, atol=1e-4)
