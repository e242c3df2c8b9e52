"""Eval mode and periodic evaluation on a tiny digits run: the metrics file, its protocol fields,
the per-term VLB breakdown, and clear errors for eval fields that cannot work."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import swissroll_config, tiny_digits_config

from diffusion_jax.errors import ConfigError
from diffusion_jax.evaluate import evaluate
from diffusion_jax.training.loop import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def eval_config(data_dir):
    config = tiny_digits_config(data_dir)
    config.eval.update(
        metrics=("vlb_bpd", "ode_bpd", "digits"), num_examples=12, batch_size=8, num_samples=16,
        ode_rtol=1e-3, ode_atol=1e-3,
    )
    return config


@pytest.fixture(scope="module")
def trained_workdir(digits_data_dir, tmp_path_factory):
    """A 4-step digits run whose training evaluates the VLB every 2 steps."""
    workdir = tmp_path_factory.mktemp("eval_run")
    config = eval_config(digits_data_dir)
    config.eval.update(metrics=("vlb_bpd",), every=2)
    train(config, workdir)
    return workdir


def test_training_evaluates_every_n_steps(trained_workdir):
    lines = [json.loads(line) for line in (trained_workdir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "eval/vlb_bpd" in line] == [2, 4]
    for step in (2, 4):
        results = json.loads((trained_workdir / "eval" / f"eval_{step}.json").read_text())
        assert results["protocol"]["vlb"]["num_timesteps"] == 100


def test_eval_mode_writes_metrics_with_their_protocol(digits_data_dir, trained_workdir):
    results = evaluate(eval_config(digits_data_dir), trained_workdir)
    metrics, protocol = results["metrics"], results["protocol"]
    # An untrained-ish model on 8-bit digits: bounds of a few bits/dim, the ODE likelihood tighter than the VLB
    # would need training; both are finite and positive, the VLB above the prior term it contains.
    assert 0 < metrics["vlb_bpd_prior"] < metrics["vlb_bpd"] < 20
    assert 0 < metrics["ode_bpd"] < 20
    assert metrics["digits_fid"] > 0 and 1.0 <= metrics["digits_is"] <= 10.0
    assert 0.0 <= metrics["digits_class_entropy"] <= np.log(10.0) + 1e-6
    assert protocol["checkpoint_step"] == 4 and protocol["params"] == "EMA 0.99"
    assert protocol["likelihood_data"] == {
        "split": "test", "num_examples": 12, "batch_size": 8, "levels": 256, "scaling": "uint8 / 127.5 - 1"
    }
    assert protocol["vlb"]["variance"] == "fixed_small" and protocol["vlb"]["clip_x0"] == 1.0
    assert protocol["ode"]["probe"] == "rademacher" and protocol["ode"]["offset_bits_per_dim"] == 7.0
    assert protocol["ode"]["nfe_per_batch"] > 0
    samples = protocol["samples"]
    assert samples["num_samples"] == 16 and samples["sampler"]["name"] == "ddim" and samples["sampler"]["steps"] == 5
    assert samples["digits"]["classifier"]
    written = json.loads((trained_workdir / "eval" / "eval_4.json").read_text())
    assert written["metrics"] == pytest.approx(metrics)
    terms = np.load(trained_workdir / "eval" / "vlb_terms_4.npz")
    assert terms["terms"].shape == (100,)
    np.testing.assert_allclose(terms["terms"].sum() + terms["prior"], metrics["vlb_bpd"], rtol=1e-5)
    lines = [json.loads(line) for line in (trained_workdir / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["eval/ode_bpd"] == pytest.approx(metrics["ode_bpd"])


def test_eval_mode_from_the_command_line(digits_data_dir, trained_workdir, tmp_path):
    workdir = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(trained_workdir), str(workdir)], check=True)
    cmd = [
        sys.executable, "-m", "diffusion_jax.main", f"--config={REPO}/configs/ddpm_digits.py",
        f"--workdir={workdir}", "--mode=eval", f"--config.data.data_dir={digits_data_dir}",
        "--config.data.image_size=8", "--config.model.ch=8", "--config.model.ch_mult=(1,2)",
        "--config.model.num_res_blocks=1", "--config.model.attn_resolutions=(4,)",
        "--config.diffusion.num_timesteps=100", "--config.training.ema_decays=(0.9,0.99)",
        "--config.sample.ema_decay=0.99", "--config.eval.metrics=('vlb_bpd',)", "--config.eval.num_examples=8",
        "--config.eval.batch_size=8", "--config.eval.checkpoint_step=2",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((workdir / "eval" / "eval_2.json").read_text())
    assert results["protocol"]["checkpoint_step"] == 2 and results["metrics"]["vlb_bpd"] > 0


@pytest.mark.parametrize(
    ("update", "match"),
    [
        ({"metrics": ("fid",)}, "eval.inception_weights: FID, IS and KID need"),
        ({"metrics": ("kid",), "inception_weights": "/nonexistent.pth"}, "eval.inception_weights: no file"),
        ({"metrics": ("fidd",)}, "eval.metrics"),
        ({"checkpoint_step": 3}, "eval.checkpoint_step: no checkpoint 3"),
        ({"ode_probe": "sphere", "metrics": ("ode_bpd",)}, "eval.ode_probe"),
        ({"batch_size": 12}, "eval.batch_size: 12 is not divisible"),
    ],
)
def test_bad_eval_fields_are_config_errors(digits_data_dir, trained_workdir, update, match):
    config = eval_config(digits_data_dir)
    config.eval.update(update)
    with pytest.raises(ConfigError, match=match):
        evaluate(config, trained_workdir)


def test_toy_data_has_no_image_metrics(tmp_path):
    config = swissroll_config()
    config.eval.every = 10
    with pytest.raises(ConfigError, match="2-D toy data"):
        train(config, tmp_path)


def random_inception_weights(path):
    """An .npz of the FID Inception with He-scaled random weights and plausible BatchNorm statistics."""
    from diffusion_jax.metrics import inception

    rng = np.random.default_rng(0)
    params = {}
    for name, shape in inception.param_shapes().items():
        if name.endswith("kernel"):
            params[name] = rng.normal(0, np.sqrt(2.0 / np.prod(shape[:-1])), shape)
        elif name.endswith((".var", ".scale")):
            params[name] = rng.uniform(0.5, 1.5, shape)
        else:
            params[name] = rng.normal(0, 0.1, shape)
    np.savez(path, **{k: v.astype(np.float32) for k, v in params.items()})
    return path


@pytest.mark.slow
def test_eval_mode_fid_is_kid_with_local_inception_weights(digits_data_dir, trained_workdir, tmp_path):
    """FID, IS and KID at 299x299 against a cached reference of 32 test images (random Inception weights)."""
    config = eval_config(digits_data_dir)
    config.eval.update(
        metrics=("fid", "inception_score", "kid"), inception_weights=str(random_inception_weights(tmp_path / "w.npz")),
        reference_split="test[:32]", inception_batch_size=16, num_samples=16, kid_subsets=10,
    )
    results = evaluate(config, trained_workdir)
    metrics, inception = results["metrics"], results["protocol"]["samples"]["inception"]
    assert metrics["fid"] > 0 and metrics["inception_score"] >= 1.0 and np.isfinite(metrics["kid"])
    assert inception["reference_num"] == 32 and inception["kid_subset_size"] == 16
    assert len(inception["weights_sha256"]) == 64 and "299x299" in inception["preprocessing"]
    cache = trained_workdir / "eval" / "reference_digits_test[:32]_8.npz"
    assert np.load(cache)["features"].shape == (32, 2048)
    again = evaluate(config, trained_workdir)  # the reference now comes from the cache: the same numbers
    assert again["metrics"] == pytest.approx(metrics)
