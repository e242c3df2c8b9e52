"""A workdir that two runs, a full disk, Ctrl-C or a changed config cannot corrupt: the lock, failed
checkpoint writes, SIGINT, the config saved in each checkpoint and `load(workdir)`."""

import collections
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest
from conftest import tiny_digits_config
from test_resilience import REPO, assert_same_state, cli_args, cli_env, wait_for

import diffusion_jax as dj
from diffusion_jax import guidance
from diffusion_jax.errors import ConfigError, TrainingStopped
from diffusion_jax.loading import check_guide
from diffusion_jax.training import checkpoint as checkpoint_lib
from diffusion_jax.training import experiment, throughput
from diffusion_jax.training.loop import train
from diffusion_jax.training.workdir_lock import LOCK_FILE, WorkdirLock, WorkdirLocked

# ---------------------------------------------------------------------------------------------- the lock


def write_lock(workdir, **fields) -> None:
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "heartbeat": time.time(),
              "token": "someone-else"} | fields
    (workdir / LOCK_FILE).write_text(json.dumps(holder))


def test_a_second_lock_on_a_workdir_names_the_holder(tmp_path):
    with WorkdirLock(tmp_path):
        with pytest.raises(WorkdirLocked, match=rf"in use by another run \(host {socket.gethostname()}, pid "
                                                rf"{os.getpid()}, started .*, heartbeat \d+s ago\)"):
            WorkdirLock(tmp_path).acquire()
    assert not (tmp_path / LOCK_FILE).exists()  # released
    WorkdirLock(tmp_path).acquire().release()


def test_a_lock_left_by_a_dead_process_is_taken_over_with_a_warning(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_lock(tmp_path, pid=dead.pid)
    with caplog.at_level(logging.WARNING), WorkdirLock(tmp_path) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert f"Took over the lock of {tmp_path} left by a run that is gone (host {socket.gethostname()}, pid " \
           f"{dead.pid}" in caplog.text


def test_a_remote_holder_is_live_until_its_heartbeat_is_stale(tmp_path):
    write_lock(tmp_path, host="another-host", pid=1, heartbeat=time.time() - 100)
    with pytest.raises(WorkdirLocked, match="host another-host, pid 1"):
        WorkdirLock(tmp_path, stale_after_s=1000).acquire()
    WorkdirLock(tmp_path, stale_after_s=60).acquire().release()  # 100 s old is stale under a 60 s limit


def test_a_lock_taken_over_by_another_run_is_noticed_by_its_old_holder(tmp_path):
    lock = WorkdirLock(tmp_path, heartbeat_s=0.05).acquire()
    write_lock(tmp_path, host="another-host", pid=7)
    wait_for(lambda: lock.lost is not None, timeout=10)
    assert "host another-host, pid 7" in lock.lost
    lock.release()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == 7  # not ours: left alone


# ------------------------------------------------------------------------------ failed checkpoint writes

Usage = collections.namedtuple("Usage", "total used free")


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, digits_data_dir):
    """Four steps with a checkpoint at each, never interrupted: the reference for bit-identical resumes."""
    workdir = tmp_path_factory.mktemp("straight")
    train(disk_config(digits_data_dir), workdir)
    return workdir


def disk_config(data_dir: str):
    config = tiny_digits_config(data_dir)
    config.training.update(num_steps=4, checkpoint_every=1, log_every=1, sample_every=0, keep_checkpoints=None)
    return config


def test_a_full_disk_stops_with_one_line_and_the_resume_is_bit_identical(
    tmp_path, digits_data_dir, straight_run, monkeypatch
):
    real = checkpoint_lib.shutil.disk_usage
    full = {"on": False}
    original_save = checkpoint_lib.Checkpointer.save

    def save(self, step, state, config):
        full["on"] = step == 3  # the disk is full when step 3 is saved
        return original_save(self, step, state, config)

    monkeypatch.setattr(checkpoint_lib.Checkpointer, "save", save)
    monkeypatch.setattr(checkpoint_lib.shutil, "disk_usage", lambda p: Usage(1, 1, 1000) if full["on"] else real(p))
    with pytest.raises(TrainingStopped) as stopped:
        train(disk_config(digits_data_dir), tmp_path)
    message = str(stopped.value)
    assert "\n" not in message
    assert message.startswith("the checkpoint of step 3 could not be written to ")
    assert "not enough free space (it needs about " in message and "1000.0 B" not in message
    assert message.endswith("KiB free); the newest intact checkpoint is step 2; stopped "
                            "(training.on_checkpoint_error='stop')")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "2"]

    monkeypatch.undo()
    train(disk_config(digits_data_dir), tmp_path)  # space again: resumes from step 2
    assert_same_state(straight_run, tmp_path, 4)


def test_a_write_that_fails_in_the_background_is_retried_at_the_next_interval(
    tmp_path, digits_data_dir, straight_run, monkeypatch, caplog
):
    """orbax's own error for a failed async write (ENOSPC from tensorstore), under 'retry'."""
    original = checkpoint_lib.ocp.CheckpointManager.wait_until_finished
    failing = {"step": None}
    original_save = checkpoint_lib.ocp.CheckpointManager.save

    def save(self, step, *args, **kwargs):
        failing["step"] = step if step == 2 else None
        return original_save(self, step, *args, **kwargs)

    def wait_until_finished(self):
        original(self)
        if failing["step"] is not None:
            step, failing["step"] = failing["step"], None
            raise ValueError(f'RESOURCE_EXHAUSTED: Error writing "step/0" in OCDBT database at local file '
                             f'"{tmp_path}/checkpoints/{step}.orbax-checkpoint-tmp/": Failed to write 119852 bytes '
                             "to file 13: No space left on device [os_error_code='28']")

    monkeypatch.setattr(checkpoint_lib.ocp.CheckpointManager, "save", save)
    monkeypatch.setattr(checkpoint_lib.ocp.CheckpointManager, "wait_until_finished", wait_until_finished)
    config = disk_config(digits_data_dir)
    config.training.on_checkpoint_error = "retry"
    with caplog.at_level(logging.ERROR):
        train(config, tmp_path)
    assert "the checkpoint of step 2 could not be written to" in caplog.text
    assert "ENOSPC: No space left on device" in caplog.text
    assert "training.on_checkpoint_error='retry': training on" in caplog.text
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "3", "4"]
    assert_same_state(straight_run, tmp_path, 4)


# --------------------------------------------------------------------- the config saved with each checkpoint


def test_resume_records_config_changes_and_refuses_a_new_model_before_compiling(
    tmp_path, digits_data_dir, monkeypatch, caplog
):
    config = tiny_digits_config(digits_data_dir)
    config.training.update(num_steps=2, sample_every=0)
    train(config, tmp_path)

    config.optim.learning_rate = 5e-4
    config.training.num_steps = 3
    with caplog.at_level(logging.INFO):
        train(config, tmp_path)
    assert "Resuming from step 2 with 2 config change(s)" in caplog.text
    history = [json.loads(line) for line in (tmp_path / "config_history.jsonl").read_text().splitlines()]
    assert history == [{"step": 2, "time": history[0]["time"], "changes": {
        "optim.learning_rate": {"from": 1e-3, "to": 5e-4}, "training.num_steps": {"from": 2, "to": 3}}}]
    assert json.loads((tmp_path / "config.json").read_text())["optim"]["learning_rate"] == 5e-4

    def no_compile(*args, **kwargs):
        raise AssertionError("compiled the train step")

    monkeypatch.setattr(throughput, "compile_step", no_compile)
    config.model.ch = 16
    with pytest.raises(ConfigError, match=r"^--workdir: this run changes what the checkpoint of step 3 was trained "
                                          r"as \(model.ch: 8 -> 16\); use a new --workdir, or pass "
                                          r"--allow_config_change"):
        train(config, tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2", "3"]


def test_load_reads_the_config_from_the_checkpoint_not_config_json(tmp_path, digits_data_dir, caplog):
    config = tiny_digits_config(digits_data_dir)
    config.training.update(num_steps=2, sample_every=0)
    state = train(config, tmp_path)
    (tmp_path / "config.json").write_text('{"broken')

    model = dj.load(tmp_path)
    assert model.step == 2 and model.config.model.ch == 8 and model.example_shape == (8, 8, 1)
    for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(state.ema_params[1]), strict=True):
        np.testing.assert_array_equal(a, b)  # sample.ema_decay=0.99 is the second EMA
    raw = dj.load(tmp_path, ema_decay=None)
    np.testing.assert_array_equal(jax.tree.leaves(raw.params)[0], jax.tree.leaves(state.params)[0])
    x = np.zeros((2, 8, 8, 1), np.float32)
    assert model.model_fn()(x, np.array([0, 5])).shape == (2, 8, 8, 1)
    # `sample` is the registry sampler on the network, x_T from the prior, options from config.sample but overridden.
    key = jax.random.key(1)
    noise_key, chain_key = jax.random.split(key)
    by_hand = dj.samplers.get("ddim")(model.model_fn(), model.schedule, chain_key,
                                      jax.random.normal(noise_key, (3, 8, 8, 1)), steps=4, prediction="eps",
                                      clip_x0=model.config.sample.clip_x0)
    np.testing.assert_allclose(model.sample(key, 3, sampler="ddim", steps=4), by_hand, atol=1e-5)
    with pytest.raises(ConfigError, match=r"^sample\(options\): the 'ddim' sampler has no option 'order'; it takes "
                                          r"\['clip_x0', 'edit', 'eta', 'spacing', 'steps'\]"):
        model.sample(key, 3, sampler="ddim", order=2)
    with pytest.raises(ConfigError, match=r"^sample.sampler: unknown sampler 'dddim'"):
        model.sample(key, 3, sampler="dddim")
    with pytest.raises(ConfigError, match=r"^workdir: 0.5 is not in training.ema_decays \[0.9, 0.99\]"):
        dj.load(tmp_path, ema_decay=0.5)
    with pytest.raises(ConfigError, match="has no checkpoints/ directory"):
        dj.load(tmp_path / "nothing")

    config.training.num_steps = 3
    with caplog.at_level(logging.WARNING):
        train(config, tmp_path)  # a resume repairs the broken config.json
    assert "config.json was not valid JSON; rewritten" in caplog.text
    assert json.loads((tmp_path / "config.json").read_text())["training"]["num_steps"] == 3

    # Autoguidance by the same run trained less (Karras et al. 2024), three ways: by hand, `sample(guide=...)`
    # and sample mode with sample.guide_workdir; all the same chain from the same key.
    model, guide = dj.load(tmp_path), dj.load(tmp_path, step=2)
    by_hand = dj.samplers.get("ddim")(guidance.autoguidance(model.model_fn(), guide.model_fn(), 1.0), model.schedule,
                                      chain_key, jax.random.normal(noise_key, (8, 8, 8, 1)), steps=5, prediction="eps",
                                      clip_x0=1.0)
    np.testing.assert_allclose(model.sample(key, 8, guide=guide, guidance_scale=2.0), by_hand, atol=1e-5)
    config.sample.update(guide_workdir=str(tmp_path), guide_step=2, guidance_scale=2.0)
    exp = experiment.build(config)  # its mesh spans the 8 test devices: the parameters go there replicated
    np.testing.assert_allclose(exp.sample_fn(dj.load(tmp_path, sharding=exp.replicated).params, key)[0], by_hand,
                               atol=1e-5)
    config.sample.guidance_scale = None
    with pytest.raises(ConfigError, match=r"^sample.guide_workdir: autoguidance needs sample.guidance_scale"):
        experiment.build(config)
    other = ml_collections.ConfigDict(guide.config.to_dict())
    other.diffusion.prediction = "v"
    with pytest.raises(ConfigError, match=r"^g: the guide's diffusion.prediction is 'v', the model's 'eps'"):
        check_guide(model.config, model.example_shape, guide._replace(config=other), "g")
    with pytest.raises(ConfigError, match=r"^g: the guide makes examples \(4, 4, 1\), the model \(8, 8, 1\)"):
        check_guide(model.config, model.example_shape, guide._replace(example_shape=(4, 4, 1)), "g")


# ----------------------------------------------------------------------- two runs, Ctrl-C, from the command line


@pytest.mark.slow
def test_ctrl_c_saves_the_current_step_and_the_resume_is_bit_identical(tmp_path, digits_data_dir):
    workdir = tmp_path / "run"
    proc = subprocess.Popen(cli_args(workdir, digits_data_dir, 100_000, **{"training.checkpoint_every": "0"}),
                            cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (workdir / "metrics.jsonl").exists() and (workdir / "metrics.jsonl").stat().st_size > 0)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted (Ctrl-C): saved the checkpoint of step "), last
    step = int(last.split("of step ")[1].split()[0])
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [step]
    assert not (workdir / LOCK_FILE).exists()

    resumed = subprocess.run(cli_args(workdir, digits_data_dir, step + 2), cwd=REPO, env=cli_env(),
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"Resumed from step {step}" in resumed.stderr
    straight = tmp_path / "straight"
    done = subprocess.run(cli_args(straight, digits_data_dir, step + 2), cwd=REPO, env=cli_env(), capture_output=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert_same_state(straight, workdir, step + 2)


@pytest.mark.slow
def test_a_second_run_is_refused_and_a_second_ctrl_c_exits_at_once(tmp_path, digits_data_dir):
    """Two runs on one workdir: the second stops with the holder named and writes nothing. Then a double
    Ctrl-C stops the first at once, and its newest complete checkpoint still loads."""
    workdir = tmp_path / "run"
    first = subprocess.Popen(cli_args(workdir, digits_data_dir, 100_000), cwd=REPO, env=cli_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (workdir / "checkpoints").exists() and
             sum(p.name.isdigit() for p in (workdir / "checkpoints").iterdir()) >= 2)

    second = subprocess.run(cli_args(workdir, digits_data_dir, 10), cwd=REPO, env=cli_env(), capture_output=True,
                            text=True, timeout=120)
    assert second.returncode == 1
    assert second.stderr.strip().splitlines()[-1].startswith(
        f"error: --workdir: {workdir} is in use by another run (host {socket.gethostname()}, pid {first.pid}, started ")
    assert "Resumed" not in second.stderr and not (workdir / "config_history.jsonl").exists()

    first.send_signal(signal.SIGINT)
    first.send_signal(signal.SIGINT)
    _, stderr = first.communicate(timeout=60)
    assert first.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    newest = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert dj.load(workdir).step == newest  # the newest complete checkpoint restores
