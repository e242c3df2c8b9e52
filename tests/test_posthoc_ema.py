"""Power-function EMA and its post-hoc reconstruction (EDM2, Karras et al. 2024)."""

import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import assert_build_errors, changed, tiny_digits_config
from safetensors import safe_open

import diffusion_jax as dj
from diffusion_jax import posthoc_ema
from diffusion_jax.convert.mapping import param_paths
from diffusion_jax.errors import ConfigError
from diffusion_jax.evaluate import evaluate
from diffusion_jax.training import ema_snapshots
from diffusion_jax.training.loop import train


def test_gamma_and_sigma_rel_are_inverse_and_match_edm2():
    # EDM2 §3.1: σ_rel 0.05 and 0.10 are γ = 16.97 and 6.94.
    assert posthoc_ema.gamma_from_sigma_rel(0.05) == pytest.approx(16.97, abs=0.01)
    assert posthoc_ema.gamma_from_sigma_rel(0.10) == pytest.approx(6.94, abs=0.01)
    for sigma_rel in (0.01, 0.08, 0.2):
        gamma = posthoc_ema.gamma_from_sigma_rel(sigma_rel)
        assert posthoc_ema.sigma_rel_from_gamma(gamma) == pytest.approx(sigma_rel, rel=1e-9)
    with pytest.raises(ValueError, match=r"sigma_rel must be in \(0, 0.2887\)"):
        posthoc_ema.gamma_from_sigma_rel(0.3)


def test_profile_inner_products_are_the_per_step_weights_and_the_integral_beyond():
    """⟨p_a, p_b⟩ is Σ_k w^a_k w^b_k of the EMAs' per-step weights (the update telescopes to w_k = F(k) − F(k−1),
    F(τ) = (τ/t)^(γ+1); checked against the update itself), exactly over the first `exact_steps` steps and by
    the integral of EDM2's continuous profiles beyond, which agrees with the sum there."""
    gamma, t = 6.9, 40
    ema, weights = np.zeros(t), np.eye(t)
    for step in range(1, t + 1):  # θ_k = e_k: the EMA's coordinates are its weights
        beta = float(posthoc_ema.power_beta(step, gamma))
        ema = beta * ema + (1.0 - beta) * weights[step - 1]
    np.testing.assert_allclose(posthoc_ema._step_weights(np.arange(1.0, t + 1), t, gamma), ema, atol=1e-6)

    def brute(ta, ga, tb, gb):
        k = np.arange(1.0, max(ta, tb) + 1)
        return posthoc_ema._step_weights(k, ta, ga) @ posthoc_ema._step_weights(k, tb, gb)

    for ta, ga, tb, gb in ((24, 17.0, 21, 6.9), (50, 6.9, 80, 17.0), (3000, 17.0, 2500, 6.9)):
        products = posthoc_ema.profile_inner_products([ta], [ga], [tb], [gb])[0, 0]
        np.testing.assert_allclose(products, brute(ta, ga, tb, gb), rtol=1e-12)
        tail_integral = posthoc_ema.profile_inner_products([ta], [ga], [tb], [gb], exact_steps=16)[0, 0]
        np.testing.assert_allclose(tail_integral, brute(ta, ga, tb, gb), rtol=0.05 if ta < 100 else 1e-5)
    tau = np.linspace(0.0, 300.0, 600_001)
    profile = lambda t, g: np.where(tau <= t, (g + 1) * tau**g / t ** (g + 1), 0.0)  # noqa: E731
    for (ta, ga), (tb, gb) in (((200, 6.9), (300, 17.0)), ((300, 3.0), (120, 6.9)), ((250, 17.0), (250, 6.9))):
        integral = posthoc_ema.profile_inner_products([ta], [ga], [tb], [gb], exact_steps=0)[0, 0]
        np.testing.assert_allclose(integral, np.trapezoid(profile(ta, ga) * profile(tb, gb), tau), rtol=1e-4)


def test_a_reconstructed_ema_equals_one_tracked_directly():
    """A toy run: parameters drifting for 2,000 steps; power EMAs of σ_rel 0.05 and 0.10 snapshotted every 100
    steps; σ_rel 0.08 (and 0.15) tracked directly as well. The EMA rebuilt from the snapshots matches it to a
    small fraction of how far it is from the EMAs that were tracked (and from the raw parameters)."""
    rng = np.random.default_rng(0)
    steps, dim = 2000, 64
    theta = np.cumsum(0.1 * rng.standard_normal((steps, dim)), 0) + np.linspace(0, 5, steps)[:, None] * rng.normal(
        size=dim)
    tracked = {s: posthoc_ema.gamma_from_sigma_rel(s) for s in (0.05, 0.10, 0.08, 0.15)}
    betas = {s: np.asarray(posthoc_ema.power_beta(np.arange(1, steps + 1), gamma)) for s, gamma in tracked.items()}
    ema = {s: theta[0] for s in tracked}
    snapshots, snapshot_steps, snapshot_gammas = [], [], []
    for t in range(2, steps + 1):
        for s, beta in betas.items():
            ema[s] = beta[t - 1] * ema[s] + (1.0 - beta[t - 1]) * theta[t - 1]
        if t % 100 == 0:
            for s in (0.05, 0.10):
                snapshots.append(ema[s])
                snapshot_steps.append(t)
                snapshot_gammas.append(tracked[s])
    assert betas[0.10][0] == 0.0  # β(1) = 0: the average starts at the first step's parameters
    for target in (0.08, 0.15):
        weights = posthoc_ema.reconstruction_weights(snapshot_steps, snapshot_gammas, steps, tracked[target])
        rebuilt = posthoc_ema.combine(snapshots, weights)
        assert weights.sum() == pytest.approx(1.0, abs=1e-3)  # a weighted average of averages
        error = np.linalg.norm(rebuilt - ema[target])
        assert error < 0.01 * np.linalg.norm(ema[0.10] - ema[target]), target
        assert error < 0.001 * np.linalg.norm(theta[-1] - ema[target]), target
    # At an earlier time, only the snapshots up to it count.
    weights = posthoc_ema.reconstruction_weights(snapshot_steps, snapshot_gammas, 1000, tracked[0.08])
    assert not weights[np.asarray(snapshot_steps) > 1000].any()
    with pytest.raises(ValueError, match="target_step 50 precedes every snapshot"):
        posthoc_ema.reconstruction_weights(snapshot_steps, snapshot_gammas, 50, tracked[0.08])


@pytest.fixture(scope="module")
def power_ema_run(tmp_path_factory, digits_data_dir):
    """A tiny digits run of 24 steps tracking power EMAs of σ_rel 0.05, 0.10 and 0.08, snapshotted every 2 steps."""
    workdir = tmp_path_factory.mktemp("power_ema")
    config = tiny_digits_config(digits_data_dir)
    config.training.update(num_steps=24, checkpoint_every=21, sample_every=0, log_every=24,
                           ema_sigma_rels=(0.05, 0.1, 0.08), ema_snapshot_every=2)
    train(config, workdir)
    return config, workdir


def _distance(a, b) -> float:
    return float(np.sqrt(sum(np.sum((np.asarray(x) - np.asarray(y)) ** 2)
                             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))))


def test_a_tracked_power_ema_is_rebuilt_from_the_other_snapshots(power_ema_run, tmp_path):
    """The train step's power EMAs and the loop's snapshots, end to end: σ_rel 0.08, tracked in training, is rebuilt
    from the snapshots of 0.05 and 0.10 alone within a small fraction of its distance to either."""
    config, workdir = power_ema_run
    snapshots = sorted(p.name for p in (workdir / "ema_snapshots").glob("*.safetensors"))
    assert snapshots[:3] == ["00000002-0.05.safetensors", "00000002-0.08.safetensors", "00000002-0.1.safetensors"]
    assert len(snapshots) == 36  # steps 2, 4, ..., 24
    tracked = {s: dj.load(workdir, ema_sigma_rel=s).params for s in (0.05, 0.1, 0.08)}
    raw = dj.load(workdir, ema_decay=None, ema_sigma_rel=None).params
    for path in (workdir / "ema_snapshots").glob("*-0.08.safetensors"):
        path.rename(tmp_path / path.name)
    try:
        rebuilt, info = ema_snapshots.reconstruct(workdir, 24, 0.08, tracked[0.08])
    finally:
        for path in tmp_path.glob("*-0.08.safetensors"):
            path.rename(workdir / "ema_snapshots" / path.name)
    assert len(info["snapshots"]) == 24 and info["profile_error"] < 1e-3
    # Exact up to float32 here: every step's weight is known (`posthoc_ema.profile_inner_products`); with EDM2's
    # continuous profiles alone (and snapshots every 3 steps) the error was 77% of the distance to σ_rel 0.10.
    error = _distance(rebuilt, tracked[0.08])
    assert error < 0.01 * min(_distance(tracked[0.05], tracked[0.08]), _distance(tracked[0.1], tracked[0.08]))
    assert error < 0.001 * _distance(raw, tracked[0.08])


def test_the_command_writes_a_post_hoc_ema(power_ema_run, tmp_path):
    _, workdir = power_ema_run
    out = subprocess.run(
        [sys.executable, "-m", "diffusion_jax.posthoc_ema", f"--workdir={workdir}", "--sigma_rels=0.12",
         f"--out_dir={tmp_path}"], capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "the post-hoc EMA σ_rel=0.12 at step 24 from 36 snapshots" in out.stderr
    expected = dj.load(workdir, ema_sigma_rel=0.12).params
    with safe_open(tmp_path / "posthoc_ema-00000024-0.12.safetensors", framework="numpy") as f:
        assert f.metadata() == {"step": "24", "sigma_rel": "0.12"}
        written = jax.tree.unflatten(jax.tree.structure(expected), [f.get_tensor(n) for n in param_paths(expected)])
    assert _distance(written, expected) == 0.0


def test_post_hoc_emas_in_load_sample_and_eval(power_ema_run, digits_data_dir):
    config, workdir = power_ema_run
    model = dj.load(workdir, ema_sigma_rel=0.12)  # untracked: rebuilt from the snapshots at step 24
    params, info = ema_snapshots.reconstruct(workdir, 24, 0.12, model.params)
    assert _distance(model.params, params) == 0.0 and info["profile_error"] < 0.05
    assert sum(info["weights"]) == pytest.approx(1.0, abs=1e-2)
    # Eval mode's sweep: each σ_rel's metrics and the best by the VLB (lower is better).
    config = config.copy_and_resolve_references()
    config.eval.update(metrics=("vlb_bpd",), num_examples=8, batch_size=8, ema_sigma_rels=(0.05, 0.15))
    results = evaluate(config, workdir)
    sweep = results["protocol"]["ema_sweep"]
    assert sweep["metric"] == "vlb_bpd" and set(sweep["results"]) == {"0.05", "0.15"}
    best = min(sweep["results"], key=lambda s: sweep["results"][s]["vlb_bpd"])
    assert results["metrics"]["best_ema_sigma_rel"] == float(best)
    assert results["metrics"]["vlb_bpd"] == sweep["results"][best]["vlb_bpd"]
    assert results["protocol"]["params"] == f"power EMA sigma_rel {float(best)}"


def test_bad_power_ema_fields_are_one_line_errors(power_ema_run, digits_data_dir, tmp_path):
    config, workdir = power_ema_run
    with pytest.raises(ConfigError, match=r"workdir \(ema_sigma_rel\): post-hoc EMA needs snapshots at step 21, "
                                          r"and .* has them at \[2, 4, 6, 8"):
        dj.load(workdir, step=21, ema_sigma_rel=0.12)
    with pytest.raises(ConfigError, match=r"ema_sigma_rel\): 0.3 is not a power EMA's σ_rel"):
        dj.load(workdir, ema_sigma_rel=0.3)
    bad = tiny_digits_config(digits_data_dir)
    bad.training.ema_sigma_rels = (0.05,)
    bad.sample.ema_sigma_rel = 0.1
    with pytest.raises(ConfigError, match=r"sample.ema_sigma_rel: 0.1 is not among training.ema_sigma_rels \(0.05,\)"):
        train(bad, tmp_path / "untracked")
    assert_build_errors([
        (changed(tiny_digits_config(digits_data_dir), {"training.ema_sigma_rels": (0.05, 0.3)}),
         r"training.ema_sigma_rels: got \(0.05, 0.3\); expected a tuple of floats in \(0, 0.2887\)"),
        (changed(tiny_digits_config(digits_data_dir), {"training.ema_sigma_rels": (0.05, 0.05)}),
         "training.ema_sigma_rels: got .*; expected distinct"),
        (changed(tiny_digits_config(digits_data_dir), {"training.ema_snapshot_every": 10}),
         "training.ema_snapshot_every: snapshots are of the power EMAs of training.ema_sigma_rels, which is empty"),
    ])
