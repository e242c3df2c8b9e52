"""Probability-flow ODE log-likelihoods (Song et al. 2021, App. D.2) against closed-form Gaussian densities.

Data x_0 ~ N(mu, Sigma) in D = 4 dimensions (shaped [B, 2, 2, 1] like images) with a non-diagonal
Sigma. The noised marginal is Gaussian too, x_t ~ N(alpha mu, C_t), C_t = alpha^2 Sigma + sigma^2 I,
so the exact model eps(x_t, t) = sigma C_t^{-1} (x_t - alpha mu), the density the ODE must return
and the flow map are all closed forms. In Sigma's eigenbasis (eigenvalues lam_i) the drift is linear,
dy_i/dt = d/dt (log c_i / 2) y_i with y = x - alpha mu and c_i = alpha^2 lam_i + sigma^2, so
z = alpha_T mu + U diag(sqrt(c_T / c_0)) U^T y_0, the integrated Jacobian is M = U diag(m) U^T with
m_i = log(c_i(T) / c_i(t_0)) / 2 for every trajectory, and a fixed probe's Hutchinson estimate of
int div dt is exactly eps^T M eps: variance 2 sum m_i^2 (Gaussian), 2 sum_{i != j} M_ij^2 (Rademacher).

t_min: the ODE starts at t_0 = t_min > 0, so it returns the density of x read as x_{t_0}, the
Gaussian N(alpha_0 mu, C_0), which is what these tests compare against. For this Sigma, C_0 differs
from Sigma by sigma_0^2 ~ 1e-4 (VP at t = 1e-3 and DDPM's first step alike): < 4e-4 bits/dim per point;
`test_t_min_reaches_the_data_density` shows where it matters.

Compiled functions are cached per configuration and reused across asserts.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import schedules, sde
from diffusion_jax.errors import ConfigError
from diffusion_jax.likelihood import bits_per_dim, dequantize, ode_bits_per_dim, ode_log_likelihood

D = 4
B = 64
SHAPE = (2, 2, 1)
NUM_PROBES = 4096
_Q = np.linalg.qr(np.random.default_rng(0).standard_normal((D, D)))[0]
MU = np.array([0.5, -0.3, 0.2, 0.0])
LAM = np.array([0.25, 0.5, 1.0, 2.0])
# A thin direction (variance 1e-4 ~ sigma^2 of VP at t = 1e-3) makes the t_min smoothing visible.
THIN_LAM = np.array([1e-4, 0.5, 1.0, 2.0])
PROCESSES = {"vp": sde.VPSDE(), "discrete": sde.as_process(schedules.linear(1000))}
CALLS: list[int] = []  # one entry per network evaluation of the counting models


class Gaussian:
    """N(mu, U diag(lam) U^T) data and its closed forms under a VP process (float64 NumPy)."""

    def __init__(self, process: sde.Process, lam: np.ndarray):
        self.process, self.lam = process, lam
        self.cov = (_Q * lam) @ _Q.T

    def sample(self, n: int, seed: int) -> np.ndarray:
        return MU + np.random.default_rng(seed).standard_normal((n, D)) @ np.linalg.cholesky(self.cov).T

    def c(self, t: float) -> tuple[float, np.ndarray]:
        """(alpha(t), eigenvalues c_i of C_t)."""
        alpha, sigma = self.process.alpha_sigma(np.float64(t))
        return alpha, alpha**2 * self.lam + sigma**2

    def log_density(self, x: np.ndarray, t: float) -> np.ndarray:
        """log N(x; alpha mu, C_t) [N] for x [N, D]; t = 0 is the data density."""
        alpha, c = self.c(t)
        y = (x - alpha * MU) @ _Q
        return -0.5 * np.sum(y**2 / c + np.log(2 * np.pi * c), axis=1)

    def m(self, t0: float) -> np.ndarray:
        """Eigenvalues of the integrated Jacobian M = int_{t0}^{T} df̃/dx dt."""
        return 0.5 * np.log(self.c(self.process.t_max)[1] / self.c(t0)[1])

    def flow_map(self, x: np.ndarray, t0: float) -> np.ndarray:
        """z = x(T) for x(t0) = x [N, D] under the exact probability-flow ODE."""
        alpha0, c0 = self.c(t0)
        alpha_T, c_T = self.c(self.process.t_max)
        return alpha_T * MU + ((x - alpha0 * MU) @ _Q * np.sqrt(c_T / c0)) @ _Q.T

    def hutchinson_std(self, t0: float, probe: str, num_probes: int) -> float:
        """Standard deviation (bits/dim) of one point's log p estimate from `num_probes` probes."""
        m = self.m(t0)
        if probe == "gaussian":
            var = 2 * np.sum(m**2)
        else:
            full = (_Q * m) @ _Q.T
            var = 2 * (np.sum(full**2) - np.sum(np.diag(full) ** 2))
        return math.sqrt(var / num_probes) / (D * math.log(2))

    def eps_model(self, count: bool = False):
        """The exact eps(x_t [B, ...], t [B]) of the noised Gaussian."""
        q, lam, mu = (jnp.asarray(a, jnp.float32) for a in (_Q, self.lam, MU))

        def model_fn(x_t: jax.Array, t: jax.Array) -> jax.Array:
            if count:
                jax.debug.callback(lambda: CALLS.append(1))
            alpha, sigma = (a[:, None] for a in self.process.alpha_sigma(t))  # [B, 1]
            y = (x_t.reshape(x_t.shape[0], -1) - alpha * mu) @ q  # [B, D] in the eigenbasis
            eps = (sigma * y / (alpha**2 * lam + sigma**2)) @ q.T
            return eps.reshape(x_t.shape)

        return model_fn


def bits(log_p: np.ndarray) -> np.ndarray:
    """-log p / (D ln 2): bits/dim of the continuous density, no dequantisation offset."""
    return -np.asarray(log_p, np.float64) / (D * math.log(2))


@functools.cache
def likelihood_fn(name: str, probe: str, num_probes: int = 1, thin: bool = False, t_min: float | None = None):
    """(the data's Gaussian, jitted (key, x) -> Likelihood), compiled once per configuration."""
    gaussian = Gaussian(PROCESSES[name], THIN_LAM if thin else LAM)
    fn = functools.partial(
        ode_log_likelihood, gaussian.eps_model(count=True), gaussian.process, probe=probe, num_probes=num_probes,
        t_min=t_min,
    )
    return gaussian, jax.jit(fn)


def run(name: str, probe: str, num_probes: int = 1, thin: bool = False, t_min: float | None = None, key: int = 0):
    """(gaussian, data x [B, D] float64 as passed in float32, Likelihood, network calls counted)."""
    gaussian, fn = likelihood_fn(name, probe, num_probes, thin, t_min)
    x = gaussian.sample(B, seed=1).astype(np.float32).astype(np.float64)
    CALLS.clear()
    out = jax.block_until_ready(fn(jax.random.key(key), jnp.asarray(x, jnp.float32).reshape(B, *SHAPE)))
    jax.effects_barrier()
    return gaussian, x, out, len(CALLS)


@pytest.mark.parametrize("name", ["vp", "discrete"])
@pytest.mark.parametrize("probe", ["gaussian", "rademacher"])
def test_hutchinson_log_likelihood_matches_the_gaussian_density(name, probe):
    gaussian, x, out, calls = run(name, probe, NUM_PROBES)
    t0 = gaussian.process.t_min
    err = bits(gaussian.log_density(x, t0)) - bits(out.log_p)  # [B] bits/dim
    std = gaussian.hutchinson_std(t0, probe, NUM_PROBES)  # per point, from the closed form
    # Averaged over the batch (the dataset bits/dim) well within 0.01; each point within 5 sigma
    # of its own probe average (sigma ~ 0.007 bits/dim Gaussian, ~0.004 Rademacher here).
    assert abs(err.mean()) < min(0.01, 5 * std / math.sqrt(B)), (err.mean(), std)
    assert np.abs(err).max() < 5 * std, (np.abs(err).max(), std)
    np.testing.assert_allclose(np.asarray(out.log_p), np.asarray(out.prior_log_p + out.delta_log_p), rtol=1e-6)
    assert out.z.shape == (B, *SHAPE) and out.log_p.shape == (B,)
    # NFE counts evaluations of the augmented drift: one network call each (the probes are JVPs).
    assert int(out.nfe) == calls and 20 < calls < 200, (int(out.nfe), calls)


@pytest.mark.parametrize("name", ["vp", "discrete"])
def test_exact_divergence_matches_tightly(name):
    gaussian, x, out, _ = run(name, "exact")
    process, t0 = gaussian.process, gaussian.process.t_min
    z = np.asarray(out.z, np.float64).reshape(B, D)
    np.testing.assert_allclose(z, gaussian.flow_map(x, t0), atol=2e-4)
    # The integrated divergence of this linear flow is tr M for every point.
    np.testing.assert_allclose(np.asarray(out.delta_log_p), np.sum(gaussian.m(t0)), atol=2e-4)
    # Prior mismatch: x_T ~ N(alpha_T mu, C_T) with alpha_T ~ 0.0066, not N(0, I). Per point it is
    # z . alpha_T mu to first order, up to ~0.004 bits/dim here, and ~1e-5 bits/dim in the mean.
    mismatch = bits(gaussian.log_density(z, process.t_max)) - bits(out.prior_log_p)
    assert 1e-4 < np.abs(mismatch).max() < 6e-3 and abs(mismatch.mean()) < 1e-3, mismatch
    err = bits(gaussian.log_density(x, t0)) - bits(out.log_p)
    assert np.abs(err).max() < 6e-3 and abs(err.mean()) < 1e-3, err
    # With the exact prior p_T instead, what is left is the solver's error.
    exact_prior = gaussian.log_density(z, process.t_max) + np.asarray(out.delta_log_p, np.float64)
    assert np.abs(bits(gaussian.log_density(x, t0)) - bits(exact_prior)).max() < 3e-4


def test_t_min_reaches_the_data_density():
    """With a data variance of 1e-4 in one direction, the density of x_{t_min} at VP's default
    t_min = 1e-3 (sigma^2 ~ 1.1e-4) is far from the data density: up to ~0.6 bits/dim per point.
    t_min = 1e-5 (score_sde's likelihood eps, sigma^2 ~ 1e-6) nearly recovers it."""
    gaussian, x, out, _ = run("vp", "exact", thin=True, t_min=1e-5)
    ode = bits(out.log_p)
    assert np.abs(ode - bits(gaussian.log_density(x, 1e-5))).max() < 6e-3  # the prior mismatch, as above
    data = bits(gaussian.log_density(x, 0.0))
    assert np.abs(ode - data).max() < 0.03 and abs(np.mean(ode - data)) < 1e-3
    assert np.abs(bits(gaussian.log_density(x, gaussian.process.t_min)) - data).max() > 0.3  # ignoring t_min


def test_bits_per_dim_offset():
    """A uniform density on [lo, hi]^D is log2(num_bins) bits/dim of the integer data."""
    for data_range, num_bins in [((-1.0, 1.0), 256), ((0.0, 1.0), 256), ((-1.0, 1.0), 32)]:
        lo, hi = data_range
        for num_dims in (1, 3072):
            log_p = jnp.full((3,), -num_dims * math.log(hi - lo))
            np.testing.assert_allclose(bits_per_dim(log_p, num_dims, data_range, num_bins), math.log2(num_bins),
                                       rtol=1e-6)
    # The +7 offset of [-1, 1] and 256 bins, on a density that is not uniform.
    np.testing.assert_allclose(bits_per_dim(jnp.array([-10.0 * math.log(2)]), 5), 2.0 + 7.0, rtol=1e-6)
    with pytest.raises(ValueError, match="data_range"):
        bits_per_dim(jnp.zeros(1), 4, (1.0, -1.0))


def test_dequantize_fills_each_pixel_bin():
    images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (64, 4, 4, 3)), jnp.uint8)
    dequantized = dequantize(jax.random.key(0), images)
    assert dequantized.dtype == jnp.float32 and dequantized.shape == images.shape
    x = np.asarray(dequantized, np.float64)
    position = (x + 1.0) * 128.0 - np.asarray(images, np.float64)  # u, the position inside the bin
    assert position.min() >= 0.0 and position.max() <= 1.0 and -1.0 <= x.min() and x.max() <= 1.0
    assert abs(position.mean() - 0.5) < 0.01 and abs(position.var() - 1 / 12) < 0.005
    np.testing.assert_array_equal(x, np.asarray(dequantize(jax.random.key(0), images), np.float64))
    assert not np.array_equal(x, np.asarray(dequantize(jax.random.key(1), images), np.float64))


def test_ode_bits_per_dim_is_seeded_and_averages_repeats():
    gaussian = Gaussian(PROCESSES["vp"], LAM)
    model = gaussian.eps_model()
    images = jnp.asarray(np.random.default_rng(2).integers(0, 256, (16, *SHAPE)), jnp.uint8)
    options = dict(probe="rademacher", num_probes=2)
    bpd_fn = jax.jit(functools.partial(ode_bits_per_dim, model, gaussian.process, num_repeats=3, **options))
    bpd, nfe = bpd_fn(jax.random.key(0), images)
    again, nfe_again = bpd_fn(jax.random.key(0), images)
    other, _ = bpd_fn(jax.random.key(1), images)
    np.testing.assert_array_equal(np.asarray(bpd), np.asarray(again))
    assert int(nfe) == int(nfe_again)
    assert np.abs(np.asarray(bpd) - np.asarray(other)).min() > 1e-4
    # Repeat r: k_r = fold_in(key, r), (dequantisation key, probe key) = split(k_r).
    likelihood = jax.jit(functools.partial(ode_log_likelihood, model, gaussian.process, **options))
    repeats, total_nfe = [], 0
    for r in range(3):
        dequant_key, probe_key = jax.random.split(jax.random.fold_in(jax.random.key(0), r))
        out = likelihood(probe_key, dequantize(dequant_key, images))
        repeats.append(np.asarray(bits_per_dim(out.log_p, D)))
        total_nfe += int(out.nfe)
    assert np.abs(repeats[0] - repeats[1]).min() > 1e-4  # each repeat dequantises afresh
    np.testing.assert_allclose(np.asarray(bpd), np.mean(repeats, axis=0), atol=1e-4)
    assert int(nfe) == total_nfe
    assert bpd.shape == (16,) and np.all((6.0 < np.asarray(bpd)) & (np.asarray(bpd) < 12.0)), bpd


def test_bad_options_name_the_field():
    gaussian = Gaussian(PROCESSES["vp"], LAM)
    model, x, key = gaussian.eps_model(), jnp.zeros((2, D)), jax.random.key(0)
    for options, field in [
        (dict(probe="normal"), "eval.ode_probe"),
        (dict(num_probes=0), "eval.ode_num_probes"),
        (dict(ode_solver="rk45"), "eval.ode_solver"),
        (dict(rtol=0.0), "eval.ode_rtol"),
        (dict(t_min=0.0), "t_min"),  # sigma(0) = 0: the score is infinite
        (dict(t_min=1.5), "t_min"),
    ]:
        with pytest.raises(ConfigError, match=field):
            ode_log_likelihood(model, gaussian.process, key, x, **options)
    with pytest.raises(ConfigError, match="gaussian, rademacher, exact"):
        ode_log_likelihood(model, gaussian.process, key, x, probe="normal")
    with pytest.raises(ConfigError, match="eval.ode_repeats"):
        ode_bits_per_dim(model, gaussian.process, key, jnp.zeros((2, *SHAPE), jnp.uint8), num_repeats=0)
