"""Schedules against independent float64 computations of the papers' formulas."""

import math

import numpy as np
import pytest

import diffusion_jax as dj
from diffusion_jax import schedules


def test_linear_alpha_bar_is_product_of_one_minus_beta():
    sched = dj.schedules.linear(num_timesteps=1000)
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    assert sched.betas.shape == (1000,) and sched.betas.dtype == np.float32
    np.testing.assert_allclose(sched.alphas_cumprod[-1], np.prod(1.0 - betas), rtol=1e-6)
    np.testing.assert_allclose(sched.alphas_cumprod, np.cumprod(1.0 - betas), rtol=1e-6)


def test_cosine_betas_follow_improved_ddpm_formula():
    T, s = 1000, 0.008

    def alpha_bar(t):
        return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2

    expected = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)]
    sched = dj.schedules.get("cosine", num_timesteps=T)
    np.testing.assert_allclose(sched.betas, np.array(expected), rtol=1e-6)
    assert float(sched.betas.max()) == pytest.approx(0.999)


def test_built_in_float64_then_cast():
    betas = schedules.linear_betas(1000)
    assert betas.dtype == np.float64
    sched = schedules.from_betas(betas)
    exact = np.cumprod(1.0 - betas).astype(np.float32)
    # A float32 cumulative product drifts; the float64 one cast once is exact to the last bit.
    np.testing.assert_array_equal(np.asarray(sched.alphas_cumprod), exact)
    drift = np.cumprod((1.0 - betas).astype(np.float32), dtype=np.float32)
    assert np.any(drift != exact)


def test_scaled_linear_and_sigmoid():
    sl = schedules.scaled_linear_betas(1000)
    np.testing.assert_allclose(np.sqrt(sl[[0, -1]]), [0.00085**0.5, 0.012**0.5])
    sg = schedules.sigmoid_betas(1000)
    assert np.all(np.diff(sg) > 0) and 1e-4 < sg[0] < sg[-1] < 0.02


def test_derived_arrays():
    sched = dj.schedules.cosine(100)
    ac = np.asarray(sched.alphas_cumprod, np.float64)
    np.testing.assert_allclose(sched.alpha**2 + sched.sigma**2, 1.0, rtol=1e-6)
    np.testing.assert_allclose(sched.log_snr, np.log(ac / (1 - ac)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(sched.alphas_cumprod_prev[0], 1.0)
    assert float(sched.posterior_variance[0]) == 0.0
    np.testing.assert_allclose(sched.posterior_log_variance_clipped[0], np.log(sched.posterior_variance[1]))
    np.testing.assert_array_equal(sched.timesteps, np.arange(100))


def test_spacings_follow_the_papers():
    np.testing.assert_array_equal(schedules.space_timesteps(1000, 50, "uniform"), np.arange(0, 1000, 20))
    np.testing.assert_array_equal(schedules.space_timesteps(1000, 50, "leading"), np.arange(0, 1000, 20))
    quad = schedules.space_timesteps(1000, 10, "quadratic")
    np.testing.assert_array_equal(quad, (np.linspace(0, np.sqrt(800), 10) ** 2).astype(int))
    np.testing.assert_array_equal(schedules.space_timesteps(1000, 4, "trailing"), [249, 499, 749, 999])
    lin = schedules.space_timesteps(1000, 250, "linspace")
    assert lin[0] == 0 and lin[-1] == 999 and len(np.unique(lin)) == 250


def test_respace_keeps_marginals_and_maps_timesteps():
    sched = dj.schedules.linear(1000)
    ts = schedules.space_timesteps(1000, 25, "linspace")
    sub = schedules.respace(sched, ts)
    np.testing.assert_allclose(sub.alphas_cumprod, np.asarray(sched.alphas_cumprod)[ts], rtol=1e-6)
    np.testing.assert_array_equal(sub.timesteps, ts)
    # Respacing a respaced schedule maps back to the original indices.
    subsub = schedules.respace(sub, np.array([0, 12, 24]))
    np.testing.assert_array_equal(subsub.timesteps, ts[[0, 12, 24]])


def test_bad_names_and_sizes():
    with pytest.raises(ValueError, match=r"diffusion.schedule: unknown schedule 'cosin'; choose one of: cosine, lin"):
        dj.schedules.get("cosin")
    with pytest.raises(ValueError, match="sample.spacing"):
        schedules.space_timesteps(1000, 10, "log")
    with pytest.raises(ValueError, match=r"sample.steps must be in \[1, 1000\]"):
        schedules.space_timesteps(1000, 0)


def test_logsnr_spacing_is_uniform_in_log_snr():
    sched = dj.schedules.linear(1000)
    ts = schedules.sampling_timesteps(sched, 20, "logsnr")
    assert len(ts) == 20
    assert ts[0] == 0 and ts[-1] == 999 and np.all(np.diff(ts) > 0)
    gaps = np.diff(np.asarray(sched.log_snr)[ts])
    assert gaps.std() < 0.1 * abs(gaps.mean())
