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
    a, info = dj.samplers.get("ddim")(eps_model, sched, jax.random.key(0), x_T, steps=10, return_trajectory=True)
    b = dj.samplers.get("ddim")(x0_model, sched, jax.random.key(0), x_T, steps=10, prediction="x0")
    traj = info.trajectory
    assert traj.shape == (11, 8, 2) and int(info.nfe) == 10
    np.testing.assert_array_equal(traj[0], x_T)
    np.testing.assert_array_equal(traj[-1], a)
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_clip_x0_bounds_the_result(sched):
    far = lambda x, t: jnp.full_like(x, -50.0)  # noqa: E731  an eps that implies huge x0
    x_T = jax.random.normal(jax.random.key(1), (8, 2))
    x0 = dj.samplers.get("ddim")(far, sched, jax.random.key(0), x_T, steps=10, clip_x0=1.0)
    assert float(jnp.abs(x0).max()) <= 1.0 + 1e-6


def test_bad_sampler_options(sched):
    with pytest.raises(ValueError, match="sample.sampler: unknown sampler 'dpm'; choose one of: consistency, ddim"):
        dj.samplers.get("dpm")
    x_T = jnp.zeros((2, 2))
    with pytest.raises(ValueError, match="sample.variance"):
        dj.samplers.get("ddpm")(lambda x, t: x, sched, jax.random.key(0), x_T, variance="learned")
    with pytest.raises(ValueError, match="diffusion.prediction"):
        dj.samplers.get("ddim")(lambda x, t: x, sched, jax.random.key(0), x_T, prediction="noise")


def test_learned_range_spans_fixed_small_and_fixed_large(sched):
    """Improved DDPM Eq. 15: v = -1 gives beta-tilde, v = +1 gives beta (the network returns [eps, v])."""
    model = gaussian_eps_model(sched)
    x_T = jax.random.normal(jax.random.key(1), (64, 2))
    key = jax.random.key(6)
    for v, fixed in ((-1.0, "fixed_small"), (1.0, "fixed_large")):

        def learned(x_t, t, v=v):
            return jnp.concatenate([model(x_t, t), jnp.full_like(x_t, v)], axis=-1)

        a = dj.samplers.get("ddpm")(learned, sched, key, x_T, steps=50, variance="learned_range")
        b = dj.samplers.get("ddpm")(model, sched, key, x_T, steps=50, variance=fixed)
        np.testing.assert_allclose(a, b, atol=1e-5)
    halfway = dj.samplers.get("ddpm")(
        lambda x_t, t: jnp.concatenate([model(x_t, t), jnp.zeros_like(x_t)], axis=-1),
        sched, key, x_T, steps=50, variance="learned_range",
    )
    assert not np.allclose(halfway, b, atol=1e-3)


def test_ddim_inversion_regenerates_x0(sched):
    """Song et al. §4.3: encode x_0 -> x_T with the reversed deterministic update, decode back."""
    model = gaussian_eps_model(sched)
    x0 = jnp.asarray(np.random.default_rng(0).multivariate_normal(MU, COV, 256), jnp.float32)
    errors = {}
    for steps in (20, 100):
        x_T, info = dj.samplers.ddim_invert(model, sched, x0, steps=steps, return_info=True)
        assert int(info.nfe) == steps - 1
        back = dj.samplers.get("ddim")(model, sched, jax.random.key(0), x_T, steps=steps)
        errors[steps] = float(jnp.sqrt(jnp.mean(jnp.square(back - x0))))
    # Euler steps of the DDIM ODE: first order, the error falls ~5x for 5x the steps (0.12 -> 0.028).
    assert errors[100] < 0.04 and errors[20] > 3.5 * errors[100]
    # x_T is a sample of the prior: about unit variance, not x_0 itself.
    x_T = dj.samplers.ddim_invert(model, sched, x0, steps=100)
    assert 0.8 < float(jnp.std(x_T)) < 1.2


def test_slerp_keeps_gaussian_norms():
    x1, x2 = jax.random.normal(jax.random.key(0), (2, 4, 512))
    np.testing.assert_allclose(dj.samplers.slerp(x1, x2, 0.0), x1, atol=1e-5)
    np.testing.assert_allclose(dj.samplers.slerp(x1, x2, 1.0), x2, atol=1e-5)
    mid = dj.samplers.slerp(x1, x2, 0.5)
    norms = jnp.linalg.norm(mid, axis=1) / jnp.linalg.norm(x1, axis=1)
    assert float(jnp.abs(norms - 1).max()) < 0.05  # the linear midpoint has norm ~0.71
    assert float(jnp.linalg.norm(0.5 * (x1 + x2), axis=1).mean() / jnp.linalg.norm(x1, axis=1).mean()) < 0.8


@pytest.mark.parametrize(
    "name,options,nfe",
    [("ddpm", dict(steps=30), 30), ("ddim", dict(steps=30), 30), ("dpm_solver++", dict(steps=12), 12),
     ("euler", dict(steps=12), 12), ("heun", dict(steps=12), 23)],
)
def test_samplers_report_their_network_evaluations(sched, name, options, nfe):
    calls = []

    def counting(x_t, t):
        jax.debug.callback(lambda: calls.append(1))  # runs once per evaluation actually executed
        return gaussian_eps_model(sched)(x_t, t)

    x_T = jnp.zeros((4, 2))
    _, info = dj.samplers.get(name)(counting, sched, jax.random.key(0), x_T, return_info=True, **options)
    jax.effects_barrier()
    assert int(info.nfe) == nfe == len(calls)
