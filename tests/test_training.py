"""The training system: sharded step equivalence, learning, resume, outputs and errors."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import nearest_distance, swissroll_config, tiny_digits_config

from diffusion_jax.data import toy
from diffusion_jax.errors import ConfigError
from diffusion_jax.sample import sample
from diffusion_jax.training import experiment, loop, optimizer
from diffusion_jax.training import state as state_lib
from diffusion_jax.training.loop import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_swissroll_learns_and_samples_land_on_the_roll(tmp_path):
    config = swissroll_config()
    config.training.update(num_steps=1500, log_every=100, checkpoint_every=1500, sample_every=1500)
    config.sample.update(num_samples=512, batch_size=512)
    state = train(config, tmp_path)

    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert np.mean(losses[-3:]) < 0.8 * losses[0]

    held_out = toy.swiss_roll(np.random.default_rng(123), 4000)
    trained = np.load(tmp_path / "samples" / "samples_1500.npz")["arr_0"]
    assert trained.shape == (512, 2)
    # The same sampler driven by the untrained (step-0) parameters.
    exp = experiment.build(config)
    untrained = np.asarray(exp.sample_fn(exp.init_state().params, jax.random.key(0))[0])
    d_trained = np.median(nearest_distance(trained, held_out))
    d_untrained = np.median(nearest_distance(untrained, held_out))
    assert d_trained < 0.15 < d_untrained, (d_trained, d_untrained)
    assert int(state.step) == 1500


def test_resume_continues_exactly(tmp_path, digits_data_dir):
    config = tiny_digits_config(digits_data_dir)
    config.training.sample_every = 0  # only at the last step
    straight = train(config, tmp_path / "straight")

    config.training.num_steps = 2
    train(config, tmp_path / "resumed")
    config.training.num_steps = 4
    resumed = train(config, tmp_path / "resumed")  # picks up the step-2 checkpoint
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(a, b)

    workdir = tmp_path / "resumed"
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4"]
    assert (workdir / "config.json").exists()
    assert any(p.name.startswith("events.out.tfevents") for p in workdir.iterdir())
    steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4]
    images = np.load(workdir / "samples" / "samples_4.npz")["arr_0"]
    assert images.dtype == np.uint8 and images.shape == (8, 8, 8, 1)
    assert (workdir / "samples" / "samples_4.png").stat().st_size > 0

    # Sample mode reads the newest checkpoint and can use another sampler.
    config.sample.update(sampler="ddpm", steps=10, num_samples=4, batch_size=8)
    png, npz = sample(config, workdir)
    assert png.name == "samples_4.png" and np.load(npz)["arr_0"].shape == (4, 8, 8, 1)


def test_train_loop_runs_at_most_one_step_ahead(monkeypatch):
    """Queuing step t's metrics waits for step t-1: unbounded run-ahead deadlocks XLA:CPU's devices."""
    waited = []
    monkeypatch.setattr(jax, "block_until_ready", lambda tree: waited.append(tree) or tree)
    metrics = loop._Metrics("stop")
    step_metrics = [{"loss": jnp.float32(t), "nonfinite": jnp.bool_(False)} for t in range(3)]
    metrics.add(1, step_metrics[0])
    assert waited == []
    metrics.add(2, step_metrics[1])
    metrics.add(3, step_metrics[2])
    assert len(waited) == 2 and waited[0] is step_metrics[0] and waited[1] is step_metrics[1]


def test_ema_tracks_params():
    params = {"w": jnp.ones(3)}
    emas = (jax.tree.map(jnp.zeros_like, params),) * 2
    out = state_lib.update_emas(emas, params, (0.9, 0.5))
    np.testing.assert_allclose(out[0]["w"], 0.1)
    np.testing.assert_allclose(out[1]["w"], 0.5)


def test_warmup_schedule():
    config = tiny_digits_config("unused")
    config.optim.update(learning_rate=1e-3, warmup_steps=10, schedule="constant")
    lr = optimizer.learning_rate_schedule(config.optim, 100)
    np.testing.assert_allclose([lr(0), lr(5), lr(10), lr(99)], [0.0, 5e-4, 1e-3, 1e-3], rtol=1e-6)
    tx = optimizer.make_optimizer(config.optim, 100)
    assert isinstance(tx, optax.GradientTransformation)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("model.name", "resnet", "model.name: unknown model 'resnet'; choose one of: DiT-B/2, DiT-B/4"),
        ("sample.sampler", "plms", "sample.sampler: unknown sampler 'plms'; choose one of: consistency, ddim"),
        ("diffusion.schedule", "cosin", "diffusion.schedule: unknown schedule 'cosin'"),
        ("data.name", "mnist", "data.name: unknown dataset 'mnist'"),
        ("data.image_size", 12, "data.image_size"),
        ("sample.spacing", "log", "sample.spacing: unknown spacing 'log'"),
        ("sample.ema_decay", 0.5, "sample.ema_decay"),
        ("optim.name", "sgd", "optim.name: unknown optimizer 'sgd'"),
        ("model.learn_sigma", True, "model.learn_sigma"),
        ("sample.guidance_scale", 2.0, "sample.guidance_scale: classifier-free guidance needs a conditional model"),
        ("diffusion.prediction", "score", "diffusion.prediction: unknown prediction 'score'"),
    ],
)
def test_bad_config_fails_before_compiling(digits_data_dir, field, value, message):
    config = tiny_digits_config(digits_data_dir)
    section, name = field.split(".")
    config[section][name] = value
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        experiment.build(config)


def run_main(*args, cwd=REPO):
    return subprocess.run(
        [sys.executable, "-m", "diffusion_jax.main", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def test_cli_errors_are_one_line(tmp_path):
    result = run_main(
        "--config=configs/ddpm_digits.py", f"--workdir={tmp_path / 'w'}", "--config.data.image_size=10"
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: data.image_size: 10") and "model.ch_mult" in last

    result = run_main("--config=configs/ddpm_swissroll.py", f"--workdir={tmp_path / 'empty'}", "--mode=sample")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --workdir: no checkpoint in") and "--mode=train" in last
    assert not (tmp_path / "empty" / "checkpoints" / "0").exists()


@pytest.mark.slow
def test_digits_end_to_end_with_resume(tmp_path, digits_data_dir):
    """The README's main command, shortened: train, stop, re-run to resume, sample."""
    workdir = tmp_path / "digits"
    common = [
        "--config=configs/ddpm_digits.py",
        f"--workdir={workdir}",
        f"--config.data.data_dir={digits_data_dir}",
        "--config.training.checkpoint_every=4",
        "--config.training.sample_every=8",
        "--config.sample.steps=10",
        "--config.sample.num_samples=16",
    ]
    first = run_main(*common, "--config.training.num_steps=8")
    assert first.returncode == 0, first.stderr[-3000:]
    assert (workdir / "samples" / "samples_8.png").exists()
    assert np.load(workdir / "samples" / "samples_8.npz")["arr_0"].shape == (16, 16, 16, 1)
    assert any(p.name.startswith("events.out.tfevents") for p in workdir.iterdir())

    second = run_main(*common, "--config.training.num_steps=12")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Resumed from step 8" in second.stderr
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())[-1] == 12

    third = run_main(*common, "--mode=sample", "--config.sample.sampler=ddpm", "--config.sample.steps=20")
    assert third.returncode == 0, third.stderr[-3000:]
    assert (workdir / "samples" / "samples_12.npz").exists()


def test_class_conditional_sampling_with_guidance(digits_data_dir):
    config = tiny_digits_config(digits_data_dir)
    config.model.num_classes = 10
    config.sample.guidance_scale = 3.0
    exp = experiment.build(config)
    samples, nfe = exp.sample_fn(exp.init_state().params, jax.random.key(0))
    assert int(nfe) == config.sample.steps
    assert samples.shape == (8, 8, 8, 1) and bool(jnp.isfinite(samples).all())
