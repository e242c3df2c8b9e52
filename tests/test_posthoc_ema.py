"""Power-function EMA and its post-hoc reconstruction (EDM2, Karras et al. 2024)."""

import numpy as np
import pytest

from diffusion_jax import posthoc_ema


def test_gamma_and_sigma_rel_are_inverse_and_match_edm2():
    # EDM2 §3.1: σ_rel 0.05 and 0.10 are γ = 16.97 and 6.94.
    assert posthoc_ema.gamma_from_sigma_rel(0.05) == pytest.approx(16.97, abs=0.01)
    assert posthoc_ema.gamma_from_sigma_rel(0.10) == pytest.approx(6.94, abs=0.01)
    for sigma_rel in (0.01, 0.08, 0.2):
        gamma = posthoc_ema.gamma_from_sigma_rel(sigma_rel)
        assert posthoc_ema.sigma_rel_from_gamma(gamma) == pytest.approx(sigma_rel, rel=1e-9)
    with pytest.raises(ValueError, match=r"sigma_rel must be in \(0, 0.2887\)"):
        posthoc_ema.gamma_from_sigma_rel(0.3)


def test_profile_inner_products_match_quadrature():
    tau = np.linspace(0.0, 300.0, 600_001)
    profile = lambda t, g: np.where(tau <= t, (g + 1) * tau**g / t ** (g + 1), 0.0)  # noqa: E731
    for (ta, ga), (tb, gb) in (((200, 6.9), (300, 17.0)), ((300, 3.0), (120, 6.9)), ((250, 17.0), (250, 6.9))):
        exact = posthoc_ema.profile_inner_products([ta], [ga], [tb], [gb])[0, 0]
        np.testing.assert_allclose(exact, np.trapezoid(profile(ta, ga) * profile(tb, gb), tau), rtol=1e-4)


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
