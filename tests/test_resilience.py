"""Runs that survive: kill -9 and resume bit for bit, SIGTERM, non-finite values,
damaged checkpoints, restore on another mesh, and a model that no longer matches."""

import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import tiny_digits_config

from diffusion_jax import data
from diffusion_jax.errors import ConfigError, TrainingStopped
from diffusion_jax.training import experiment
from diffusion_jax.training import mesh as mesh_lib
from diffusion_jax.training.checkpoint import Checkpointer, abstract_like
from diffusion_jax.training.loop import train
from diffusion_jax.training.step import make_train_step

REPO = Path(__file__).resolve().parents[1]


def cli_args(workdir: Path, data_dir: str, num_steps: int, **extra: str) -> list[str]:
    """The digits config shrunk to the tiny model of conftest.tiny_digits_config."""
    overrides = {
        "data.image_size": "8", "data.data_dir": data_dir, "model.ch": "8", "model.ch_mult": "(1,2)",
        "model.num_res_blocks": "1", "model.attn_resolutions": "(4,)", "model.dropout": "0.1",
        "diffusion.num_timesteps": "100", "training.batch_size": "16", "training.num_steps": str(num_steps),
        "training.log_every": "1", "training.checkpoint_every": "1", "training.sample_every": "0",
        "sample.steps": "2", "sample.num_samples": "8", "sample.batch_size": "8",
    } | extra
    return [sys.executable, "-m", "diffusion_jax.main", "--config=configs/ddpm_digits.py", f"--workdir={workdir}"] + [
        f"--config.{k}={v}" for k, v in overrides.items()
    ]


def cli_env() -> dict[str, str]:
    """A shared persistent compilation cache makes the repeated subprocess runs cheap."""
    cache = os.path.join(tempfile.gettempdir(), "diffusion_jax_test_xla_cache")
    return os.environ | {"JAX_COMPILATION_CACHE_DIR": cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5"}


def saved_state(workdir: Path, step: int) -> list[np.ndarray]:
    restored = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")
    return jax.tree.leaves(restored)


def assert_same_state(a: Path, b: Path, step: int) -> None:
    leaves_a, leaves_b = saved_state(a, step), saved_state(b, step)
    assert len(leaves_a) == len(leaves_b) > 10
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(x, y)


def wait_for(predicate, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_is_bit_identical(tmp_path, digits_data_dir):
    steps = 10
    straight = tmp_path / "straight"
    done = subprocess.run(cli_args(straight, digits_data_dir, steps), cwd=REPO, env=cli_env(), capture_output=True)
    assert done.returncode == 0, done.stderr[-2000:]

    killed = tmp_path / "killed"
    proc = subprocess.Popen(cli_args(killed, digits_data_dir, steps), cwd=REPO, env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # A save starts every step, so the kill lands in one most of the time.
    wait_for(lambda: any(p.name.split(".")[0].isdigit() and int(p.name.split(".")[0]) >= 4
                         for p in (killed / "checkpoints").glob("*")) if (killed / "checkpoints").exists() else False)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = sorted(int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit())
    assert finished and finished[-1] < steps
    # Whatever the kill left, make sure the next step is a half-written async save too.
    newest = finished[-1]
    partial = killed / "checkpoints" / f"{newest + 1}.orbax-checkpoint-tmp"
    if not partial.exists():
        (partial / "state").mkdir(parents=True)
        (partial / "state" / "_METADATA").write_text('{"truncated')

    resumed = subprocess.run(cli_args(killed, digits_data_dir, steps), cwd=REPO, env=cli_env(), capture_output=True,
                             text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"Resumed from step {newest}" in resumed.stderr
    assert_same_state(straight, killed, steps)


def test_sigterm_saves_the_current_step_and_exits_zero(tmp_path, digits_data_dir):
    workdir = tmp_path / "run"
    args = cli_args(workdir, digits_data_dir, 100_000, **{"training.checkpoint_every": "0"})
    proc = subprocess.Popen(args, cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (workdir / "metrics.jsonl").exists() and (workdir / "metrics.jsonl").stat().st_size > 0)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    line = next(line for line in stderr.splitlines() if "Preempted: saved the checkpoint of step" in line)
    step = int(line.split("of step ")[1].split()[0])
    assert 0 < step < 100_000
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [step]


def poisoned_iterator(poison_step: int):
    """Wraps data.create_iterator so that the batch of `poison_step` holds a NaN."""
    create = data.create_iterator

    def create_iterator(*args, start_step=0, **kwargs):
        for step, batch in enumerate(create(*args, start_step=start_step, **kwargs), start=start_step + 1):
            if step == poison_step:
                batch = dict(batch, image=batch["image"].at[0, 0, 0, 0].set(jnp.nan))
            yield batch

    return create_iterator


def test_nonfinite_stop_keeps_the_last_good_checkpoint(tmp_path, digits_data_dir, monkeypatch):
    monkeypatch.setattr(data, "create_iterator", poisoned_iterator(3))
    config = tiny_digits_config(digits_data_dir)
    config.training.update(num_steps=6, checkpoint_every=2, log_every=1, on_nonfinite="stop")
    with pytest.raises(TrainingStopped, match=r"non-finite loss or gradient at step 3 .*step 2\) is kept"):
        train(config, tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2"]
    assert not (tmp_path / "samples").exists()


def test_nonfinite_skip_drops_the_update_and_counts_it(tmp_path, digits_data_dir, monkeypatch):
    monkeypatch.setattr(data, "create_iterator", poisoned_iterator(3))
    config = tiny_digits_config(digits_data_dir)
    config.training.update(num_steps=4, checkpoint_every=0, log_every=2, on_nonfinite="skip")
    state = train(config, tmp_path)
    assert int(state.step) == 4 and int(state.skipped_steps) == 1
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["skipped_steps"] for line in lines] == [0.0, 1.0]
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(state.params))


def copied_parameters(hlo: str) -> list[str]:
    """The non-scalar ENTRY parameters of an optimised HLO module that a `copy` instruction reads."""
    entry = hlo[hlo.index("\nENTRY ") :]
    parameters = set(re.findall(r"%([\w.\-]+) = [^\n]*? parameter\(\d+\)", entry))
    return [name for name in re.findall(r"= \w+\[\d[^\]]*\]\S* copy\(%([\w.\-]+)\)", entry) if name in parameters]


def test_nonfinite_step_leaves_params_and_optimizer_untouched_and_copies_no_donated_buffer(digits_data_dir):
    config = tiny_digits_config(digits_data_dir)
    exp = experiment.build(config)
    step = jax.jit(make_train_step(exp.graphdef, exp.objective, exp.tx, exp.lr_schedule, config), donate_argnums=0)
    batch = {"image": jnp.full((16, 8, 8, 1), jnp.nan), "label": jnp.zeros(16, jnp.int32)}
    state = exp.init_state()
    compiled = step.lower(state, batch).compile()
    # The update is a `cond` on finiteness, so the donated state is updated in place: a per-leaf
    # select kept old and new alive together and XLA copied every parameter and moment first.
    assert copied_parameters(compiled.as_text()) == []
    before = jax.tree.map(np.asarray, state)
    new, metrics = compiled(state, batch)
    assert int(metrics["nonfinite"]) == 1 and int(new.step) == 1 and int(new.skipped_steps) == 1
    for name in ("params", "ema_params", "opt_state"):
        for a, b in zip(jax.tree.leaves(getattr(new, name)), jax.tree.leaves(getattr(before, name)), strict=True):
            np.testing.assert_array_equal(a, b)


# orbax abandons its reads of the truncated files; their coroutines are collected later.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_truncated_newest_checkpoint_falls_back_with_a_warning(tmp_path, digits_data_dir, caplog):
    config = tiny_digits_config(digits_data_dir)
    config.training.update(num_steps=4, checkpoint_every=2, sample_every=0)
    train(config, tmp_path)
    # Every data file truncated: which file holds which array depends on orbax's write timing.
    data_files = sorted((tmp_path / "checkpoints" / "4" / "state").rglob("d/*"), key=lambda p: p.stat().st_size)
    for data_file in data_files:
        data_file.write_bytes(data_file.read_bytes()[:16])
    damaged = data_files[-1]

    exp = experiment.build(config)
    checkpointer = Checkpointer(tmp_path / "checkpoints")
    with caplog.at_level(logging.WARNING):
        state = checkpointer.restore(exp.abstract_state)
    checkpointer.close()
    assert int(state.step) == 2
    assert "Skipped the damaged checkpoint of step 4" in caplog.text
    assert damaged.exists()  # restoring deleted nothing

    # Training on re-saves step 4; the damaged copy is moved aside, not deleted.
    config.training.num_steps = 6
    train(config, tmp_path)
    assert [p.name.split("-")[0] for p in (tmp_path / "damaged_checkpoints").iterdir()] == ["4"]
    assert {"4", "6"} <= {p.name for p in (tmp_path / "checkpoints").iterdir()}


@pytest.mark.parametrize("save_devices,restore_devices", [(8, 1), (1, 8)])
def test_checkpoint_restores_on_another_mesh(tmp_path, digits_data_dir, save_devices, restore_devices):
    config = tiny_digits_config(digits_data_dir)
    state = experiment.build(config).init_state()
    save_mesh = mesh_lib.make_mesh(None, jax.devices()[:save_devices])
    saved = jax.device_put(state, mesh_lib.replicated(save_mesh))
    checkpointer = Checkpointer(tmp_path)
    checkpointer.save(7, saved, config)
    checkpointer.wait()
    restore_sharding = mesh_lib.replicated(mesh_lib.make_mesh(None, jax.devices()[:restore_devices]))
    restored = checkpointer.restore(abstract_like(state, restore_sharding))
    checkpointer.close()
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        assert len(a.sharding.device_set) == restore_devices
        np.testing.assert_array_equal(a, b)


def test_resuming_with_another_model_names_the_mismatch(tmp_path, digits_data_dir):
    config = tiny_digits_config(digits_data_dir)
    config.training.update(num_steps=2, sample_every=0)
    train(config, tmp_path)
    config.model.ch = 16  # refused as a change of the model (test_workdir.py); allowed, the shapes still differ
    with pytest.raises(ConfigError, match=r"the checkpoint of step 2 .* params/\S+ is shape \(\S+\) in the "
                                          r"checkpoint but has shape \(\S+\) here"):
        train(config, tmp_path, allow_config_change=True)
    # Changing only cadences is allowed.
    config.model.ch = 8
    config.training.update(num_steps=3, log_every=3, checkpoint_every=3, sample_every=3)
    assert int(train(config, tmp_path).step) == 3
