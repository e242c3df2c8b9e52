"""Linear inverse problems (`diffusion_jax.inverse`) against the closed-form posterior of Gaussian data: for
y = A x_0 + σ_y n and x_0 ~ N(μ, Σ), x_0 | y ~ N(S (Σ⁻¹ μ + Aᵀ y / σ_y²), S), S = (Σ⁻¹ + Aᵀ A / σ_y²)⁻¹."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffusion_jax as dj
from diffusion_jax import inverse
from diffusion_jax.errors import ConfigError

SHAPE = (4, 4, 1)
D = 16
RNG = np.random.default_rng(0)
FACTOR = RNG.normal(size=(D, D))
COV = FACTOR @ FACTOR.T / D + 0.05 * np.eye(D)  # correlated pixels: what is measured says much about the rest
MEAN = 0.5 * RNG.normal(size=D)
NOISE = 0.1


def exact_x0(process, mean, cov):
    """E[x_0 | x_t] of N(mean, cov) images [B, 4, 4, 1]: mean + α cov (α² cov + σ² I)⁻¹ (x_t − α mean)."""
    cov, mean = jnp.asarray(cov, jnp.float32), jnp.asarray(mean, jnp.float32)

    def model_fn(x_t, t):
        alpha, sigma = (jnp.asarray(c, jnp.float32)[0] for c in process.alpha_sigma(t))
        gain = alpha * cov @ jnp.linalg.inv(alpha**2 * cov + sigma**2 * jnp.eye(D))
        flat = x_t.reshape(len(x_t), D)
        return (mean + (flat - alpha * mean) @ gain.T).reshape(x_t.shape)

    return model_fn


def matrix(operator):
    """A as a [dim y, D] matrix, column j = A e_j."""
    basis = jnp.eye(D, dtype=jnp.float32).reshape(D, *SHAPE)
    return np.asarray(operator.apply(basis)).reshape(D, -1).T


def posterior(a, y, mean, cov):
    precision = np.linalg.inv(cov) + a.T @ a / NOISE**2
    s = np.linalg.inv(precision)
    return s @ (np.linalg.solve(cov, mean) + a.T @ y / NOISE**2), s


OPERATORS = {
    "mask": inverse.mask(jnp.asarray(RNG.random(SHAPE) < 0.5, jnp.float32)),
    "blur": inverse.blur(3, 1.0),
    "downsample": inverse.downsample(2),
}


def draw(method, operator, mean, cov, n=4096, scale=1.0):
    """n samples of the posterior by `method` (DDIM, 100 steps, deterministic), and the closed form."""
    schedule = dj.schedules.get("cosine", 1000)
    x_true = (mean + np.linalg.cholesky(cov) @ np.random.default_rng(1).normal(size=D)).astype(np.float32)
    x_true = x_true.reshape(1, *SHAPE)
    y = inverse.measure(operator, jnp.asarray(x_true), NOISE, jax.random.key(3))
    want_mean, want_cov = posterior(matrix(operator), np.asarray(y).reshape(-1), mean, cov)
    model_fn = inverse.posterior_denoiser(exact_x0(schedule, mean, cov), schedule, "x0", operator, y, NOISE,
                                          method=method, scale=scale, cg_steps=16)
    sample = jax.jit(functools.partial(dj.samplers.get("ddim"), model_fn, schedule, prediction="x0", steps=100,
                                       eta=0.0, clip_x0=None))
    x0 = np.asarray(sample(jax.random.key(1), jax.random.normal(jax.random.key(0), (n, *SHAPE)))).reshape(n, D)
    return x0, want_mean, want_cov


def assert_moments(x0, want_mean, want_cov):
    """The sample mean and covariance within 5 standard errors (plus DDIM's small discretisation error)."""
    n = len(x0)
    mean_se = np.sqrt(np.diag(want_cov) / n)
    assert np.all(np.abs(x0.mean(0) - want_mean) < 5 * mean_se + 2e-3), (x0.mean(0) - want_mean) / mean_se
    cov_se = np.sqrt((want_cov**2 + np.outer(np.diag(want_cov), np.diag(want_cov))) / n)  # of a Gaussian's
    assert np.all(np.abs(np.cov(x0.T) - want_cov) < 5 * cov_se + 5e-3), np.max(np.abs(np.cov(x0.T) - want_cov) / cov_se)


@pytest.mark.parametrize("name", list(OPERATORS))
def test_tweedie_samples_the_exact_posterior_of_gaussian_data(name):
    assert_moments(*draw("tweedie", OPERATORS[name], MEAN, COV))


def test_pigdm_is_exact_for_unit_variance_data_and_dps_approaches_the_posterior():
    assert_moments(*draw("pigdm", OPERATORS["blur"], MEAN, np.eye(D)))
    # DPS ignores Cov[x_0 | x_t]: not exact, but its samples fit the measurement as the posterior's do and their
    # mean is far closer to the posterior's than the prior's is.
    x0, want_mean, want_cov = draw("dps", OPERATORS["blur"], MEAN, COV, n=1024, scale=10.0)
    a = matrix(OPERATORS["blur"])
    fit = np.sqrt(np.mean((x0 @ a.T - a @ want_mean) ** 2))
    assert fit < 1.5 * np.sqrt(np.trace(a @ want_cov @ a.T) / len(a))
    assert np.linalg.norm(x0.mean(0) - want_mean) < 0.5 * np.linalg.norm(MEAN - want_mean)


def test_bad_inverse_settings_are_one_line_errors():
    with pytest.raises(ConfigError, match="inverse.method: unknown method 'dsp'; choose one of: tweedie, pigdm, dps"):
        inverse.x0_correction(OPERATORS["blur"], jnp.zeros((1, *SHAPE)), NOISE, method="dsp")
    with pytest.raises(ConfigError, match="inverse.blur_size, inverse.blur_std: got 4, 1.0; expected an odd size"):
        inverse.blur(4, 1.0)
    with pytest.raises(ConfigError, match="inverse.noise_std: got -0.1"):
        inverse.x0_correction(OPERATORS["blur"], jnp.zeros((1, *SHAPE)), -0.1)
