"""Samplers driven by the exact denoiser of Gaussian data must reproduce that Gaussian."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffusion_jax as dj
from diffusion_jax import diffusion

MU = np.array([0.6, -0.4])
COV = np.array([[0.30, 0.12], [0.12, 0.20]])
N = 20_000


@pytest.fixture(scope="module")
def sched():
    return dj.schedules.linear(1000)


def gaussian_eps_model(sched, shape=(2,)):
    """eps(x_t, t) = (x_t - alpha E[x0|x_t]) / sigma for x0 ~ N(MU, COV), exactly.

    E[x0 | x_t] = MU + alpha COV (alpha^2 COV + sigma^2 I)^-1 (x_t - alpha MU).
    Points arrive in any shape [B, *shape] and are flattened to [B, 2].
    """
    mu, cov = jnp.asarray(MU, jnp.float32), jnp.asarray(COV, jnp.float32)

    def model_fn(x_t, t):
        x = x_t.reshape(x_t.shape[0], 2)
        alpha, sigma = sched.alpha[t[0]], sched.sigma[t[0]]  # samplers visit one t per step
        gain = alpha * cov @ jnp.linalg.inv(alpha**2 * cov + sigma**2 * jnp.eye(2))
        x0 = mu + (x - alpha * mu) @ gain.T
        return ((x - alpha * x0) / sigma).reshape(x_t.shape)

    return model_fn


def assert_matches_gaussian(x):
    """Mean and covariance within ~5 Monte-Carlo standard errors (N = 20k: 0.004, 0.003)."""
    x = np.asarray(x, np.float64).reshape(x.shape[0], 2)
    np.testing.assert_allclose(x.mean(0), MU, atol=0.02)
    np.testing.assert_allclose(np.cov(x.T), COV, atol=0.015)


# Full-length chains: with few steps DDIM under-disperses (discretisation error, e.g. the
# x-variance is 0.268 instead of 0.30 at 50 uniform steps), which is the method, not a bug.
@pytest.mark.parametrize(
    "name,options",
    [
        ("ddpm", dict(steps=None)),
        ("ddpm", dict(steps=None, variance="fixed_large")),
        ("ddim", dict(steps=1000, eta=0.0)),
    ],
)
def test_sampler_reproduces_gaussian_data(sched, name, options):
    x_T = jax.random.normal(jax.random.key(1), (N, 2))
    x0 = jax.jit(lambda k, x: dj.samplers.get(name)(gaussian_eps_model(sched), sched, k, x, **options))(
        jax.random.key(2), x_T
    )
    assert_matches_gaussian(x0)


def test_samplers_take_any_shape(sched):
    x_T = jax.random.normal(jax.random.key(1), (N, 1, 2, 1))
    x0 = dj.samplers.get("ddpm")(gaussian_eps_model(sched), sched, jax.random.key(0), x_T)
    assert x0.shape == x_T.shape
    assert_matches_gaussian(x0)


def test_ddim_eta0_is_deterministic(sched):
    model = gaussian_eps_model(sched)
    x_T = jax.random.normal(jax.random.key(1), (16, 2))
    a = dj.samplers.get("ddim")(model, sched, jax.random.key(3), x_T, steps=20)
    b = dj.samplers.get("ddim")(model, sched, jax.random.key(4), x_T, steps=20)
    np.testing.assert_array_equal(a, b)
    c = dj.samplers.get("ddim")(model, sched, jax.random.key(4), x_T, steps=20, eta=1.0)
    assert not np.allclose(a, c)


def test_ddim_eta1_equals_respaced_ddpm(sched):
    """Song et al. §4.1: eta = 1 makes DDIM the ancestral DDPM sampler on the same steps."""
    model = gaussian_eps_model(sched)
    x_T = jax.random.normal(jax.random.key(1), (16, 2))
    key = jax.random.key(5)
    ddim = dj.samplers.get("ddim")(model, sched, key, x_T, steps=20, eta=1.0, spacing="linspace")
    ddpm = dj.samplers.get("ddpm")(model, sched, key, x_T, steps=20, spacing="linspace")
    np.testing.assert_allclose(ddim, ddpm, atol=1e-4)


def test_trajectory_and_prediction_kinds(sched):
    eps_model = gaussian_eps_model(sched)

    def x0_model(x_t, t):  # the same denoiser, reporting x0 instead of eps
        alpha, sigma = diffusion.extract(sched.alpha, t, x_t), diffusion.extract(sched.sigma, t, x_t)
        return diffusion.x0_from_eps(x_t, eps_model(x_t, t), alpha, sigma)

    x_T = jax.random.normal(jax.random.key(1), (8, 2))
    a, traj = dj.samplers.get("ddim")(eps_model, sched, jax.random.key(0), x_T, steps=10, return_trajectory=True)
    b = dj.samplers.get("ddim")(x0_model, sched, jax.random.key(0), x_T, steps=10, prediction="x0")
    assert traj.shape == (11, 8, 2)
    np.testing.assert_array_equal(traj[0], x_T)
    np.testing.assert_array_equal(traj[-1], a)
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_clip_x0_bounds_the_result(sched):
    far = lambda x, t: jnp.full_like(x, -50.0)  # noqa: E731  an eps that implies huge x0
    x_T = jax.random.normal(jax.random.key(1), (8, 2))
    x0 = dj.samplers.get("ddim")(far, sched, jax.random.key(0), x_T, steps=10, clip_x0=1.0)
    assert float(jnp.abs(x0).max()) <= 1.0 + 1e-6


def test_bad_sampler_options(sched):
    with pytest.raises(ValueError, match="sample.sampler: unknown sampler 'dpm'; choose one of: ddim, ddpm"):
        dj.samplers.get("dpm")
    x_T = jnp.zeros((2, 2))
    with pytest.raises(ValueError, match="sample.variance"):
        dj.samplers.get("ddpm")(lambda x, t: x, sched, jax.random.key(0), x_T, variance="learned_range")
    with pytest.raises(ValueError, match="diffusion.prediction"):
        dj.samplers.get("ddim")(lambda x, t: x, sched, jax.random.key(0), x_T, prediction="score")
