"""Inpainting as a denoiser transform (`diffusion_jax.inpaint`): with the exact denoiser of correlated Gaussian
data, samplers driven by it draw the exact conditional Gaussian, and the known pixels come out exactly."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

import diffusion_jax as dj
from diffusion_jax import inpaint

RNG = np.random.default_rng(0)
D = 4
FACTOR = RNG.normal(size=(D, D))
COV = FACTOR @ FACTOR.T / D + 0.05 * np.eye(D)  # correlated: the known pixels say much about the others
MEAN = RNG.normal(size=D)


def exact_x0(process):
    """E[x_0 | x_t] of N(MEAN, COV) data: MEAN + α COV (α² COV + σ² I)⁻¹ (x_t - α MEAN)."""
    cov, mean = jnp.asarray(COV, jnp.float32), jnp.asarray(MEAN, jnp.float32)

    def model_fn(x_t, t):
        alpha, sigma = process.alpha_sigma(t)
        alpha, sigma = jnp.asarray(alpha, jnp.float32)[0], jnp.asarray(sigma, jnp.float32)[0]
        gain = alpha * cov @ jnp.linalg.inv(alpha**2 * cov + sigma**2 * jnp.eye(D))
        return mean + (x_t - alpha * mean) @ gain.T

    return model_fn


def test_the_conditional_denoiser_samples_the_exact_conditional_gaussian():
    schedule = dj.schedules.get("cosine", 1000)
    known_index = np.array([0, 2])
    y = np.zeros(D)
    y[known_index] = [1.2, -0.7]
    mask = np.zeros(D)
    mask[known_index] = 1.0
    u = np.array([1, 3])  # the closed form: x_u | x_k = y ~ N(μ_u + Σ_uk Σ_kk⁻¹ (y - μ_k), Σ_uu - Σ_uk Σ_kk⁻¹ Σ_ku)
    gain = COV[np.ix_(u, known_index)] @ np.linalg.inv(COV[np.ix_(known_index, known_index)])
    want_mean = MEAN[u] + gain @ (y[known_index] - MEAN[known_index])
    want_cov = COV[np.ix_(u, u)] - gain @ COV[np.ix_(known_index, u)]
    model_fn = inpaint.conditional_denoiser(exact_x0(schedule), schedule, "x0", jnp.asarray(y, jnp.float32),
                                            jnp.asarray(mask, jnp.float32), cg_steps=2)
    n = 16384
    x_T = jax.random.normal(jax.random.key(0), (n, D))
    for name, options in (("ddpm", {"steps": 1000}), ("ddim", {"steps": 200, "eta": 0.0})):
        sample = jax.jit(functools.partial(dj.samplers.get(name), model_fn, schedule, prediction="x0", clip_x0=None,
                                           **options))
        x0 = np.asarray(sample(jax.random.key(1), x_T))
        np.testing.assert_allclose(x0[:, known_index], np.broadcast_to(y[known_index], (n, 2)), atol=1e-5)
        sem = np.sqrt(np.diag(want_cov) / n)
        assert np.all(np.abs(x0[:, u].mean(0) - want_mean) < 5 * sem), (name, x0[:, u].mean(0), want_mean)
        np.testing.assert_allclose(np.cov(x0[:, u].T), want_cov, atol=0.03, err_msg=name)


def test_with_nothing_known_it_is_the_unconditional_denoiser():
    schedule = dj.schedules.get("linear", 1000)
    model_fn = exact_x0(schedule)
    free = inpaint.conditional_denoiser(model_fn, schedule, "x0", jnp.zeros(D), jnp.zeros(D))
    x = jax.random.normal(jax.random.key(2), (8, D))
    t = jnp.full((8,), 500)
    np.testing.assert_allclose(free(x, t), model_fn(x, t), atol=1e-6)
