"""Fréchet distance, Inception Score and KID against closed forms."""

import numpy as np
import pytest
from scipy import linalg

from diffusion_jax.metrics import stats


def test_frechet_distance_of_diagonal_gaussians_is_its_closed_form():
    """For commuting (diagonal) covariances, d^2 = |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2."""
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    a, b = rng.uniform(0.1, 3.0, 16), rng.uniform(0.1, 3.0, 16)
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert stats.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-12)


def test_frechet_distance_of_rotated_gaussians_matches_the_trace_formula():
    """Non-commuting covariances: Tr(S1 + S2 - 2 (S1 S2)^1/2) by scipy's sqrtm, and 0 for equal Gaussians."""
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(32, 32)), rng.normal(size=(32, 32))
    s1, s2 = a @ a.T / 32 + 0.1 * np.eye(32), b @ b.T / 32
    mu1, mu2 = rng.normal(size=32), rng.normal(size=32)
    want = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert stats.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-9)
    assert abs(stats.frechet_distance(mu1, s1, mu1, s1)) < 1e-9
    # a rank-deficient covariance (fewer samples than dimensions) stays real and finite
    low_rank = b[:, :4] @ b[:, :4].T
    assert np.isfinite(stats.frechet_distance(mu1, low_rank, mu2, s1))


def test_feature_stats_round_trip_through_npz(tmp_path):
    features = np.random.default_rng(2).normal(size=(100, 8))
    fs = stats.feature_stats(features)
    np.testing.assert_allclose(fs.sigma, np.cov(features, rowvar=False))
    stats.save_stats(tmp_path / "ref.npz", fs, dataset="digits", split="train")
    loaded = stats.load_stats(tmp_path / "ref.npz")
    np.testing.assert_array_equal(loaded.mu, fs.mu)
    assert loaded.num == 100 and stats.fid_from_stats(fs, loaded) == pytest.approx(0.0, abs=1e-9)
    np.savez(tmp_path / "bad.npz", mean=fs.mu)
    with pytest.raises(ValueError, match="'mu' and 'sigma'"):
        stats.load_stats(tmp_path / "bad.npz")


def test_inception_score_limits():
    """Uninformative p(y|x): IS = 1; confident and balanced over K classes: IS = K."""
    assert stats.inception_score(np.zeros((100, 10)), num_splits=2)[0] == pytest.approx(1.0)
    confident = 50.0 * np.eye(10)[np.arange(1000) % 10]
    mean, std = stats.inception_score(confident, num_splits=10)
    assert mean == pytest.approx(10.0, rel=1e-6) and std < 1e-6
    assert stats.inception_score(50.0 * np.eye(10)[np.zeros(100, int)], num_splits=1)[0] == pytest.approx(1.0)


def test_kid_is_unbiased_near_zero_for_one_distribution_and_large_for_two():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(2000, 16)), rng.normal(size=(2000, 16))
    same, same_std = stats.kernel_inception_distance(x, y, num_subsets=50, subset_size=500)
    assert abs(same) < 3 * same_std / np.sqrt(50) + 1e-3  # unbiased MMD^2: centred on 0
    shifted, _ = stats.kernel_inception_distance(x, y + 1.0, num_subsets=10, subset_size=500)
    assert shifted > 100 * abs(same)
