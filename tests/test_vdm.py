"""Variational diffusion models' pure functions: the continuous VLB against the exact likelihood of Gaussian
data, the variance-minimising schedule gradient, the monotonic γ, the decoder and the Fourier features."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import diffusion_jax as dj
from diffusion_jax import exact, vdm

S = 0.7  # the data: x ~ N(0, S² I)
DIM = 256


def exact_eps(z: jax.Array, t: jax.Array, gamma_fn) -> jax.Array:
    """ε̂ = E[ε | z_t] of N(0, S² I) data: (z - α x̂) / σ with x̂ = α S² z / (α² S² + σ²)."""
    alpha, sigma = (a[:, None] for a in vdm.alpha_sigma(gamma_fn(t)))
    x_hat = alpha * S**2 * z / (alpha**2 * S**2 + sigma**2)
    return (z - alpha * x_hat) / sigma


def gaussian_nll_bpd(x: jax.Array) -> float:
    """-log N(x; 0, S² I) per dimension in bits, averaged over the examples x [B, D]."""
    return float(jnp.mean(0.5 * (jnp.log(2 * math.pi * S**2) + jnp.square(x) / S**2))) / math.log(2.0)


def data(key: jax.Array, batch: int = 4096, dim: int = DIM) -> jax.Array:
    return S * jax.random.normal(key, (batch, dim))


def vlb_gap_bpd(gamma_fn, num_keys: int = 16) -> float:
    """The VLB of the exact model less the exact NLL of the same data, in bits/dim, over num_keys batches."""
    one = jax.jit(lambda x, key: jnp.mean(vdm.vlb(lambda z, t: exact_eps(z, t, gamma_fn), gamma_fn, x, key)["bpd"]))
    gaps = [float(one(x, jax.random.key(i))) - gaussian_nll_bpd(x)
            for i, x in enumerate(data(jax.random.key(1000 + i)) for i in range(num_keys))]
    return float(np.mean(gaps))


def test_the_continuous_vlb_of_the_exact_model_is_the_exact_likelihood():
    # The learned schedule at initialisation and a linear one with the same endpoints: the same, tight bound.
    assert abs(vlb_gap_bpd(vdm.MonotonicGamma(rngs=nnx.Rngs(0)))) < 0.01
    assert abs(vlb_gap_bpd(lambda t: -13.3 + 18.3 * t)) < 0.01
    # Endpoints that cut the path short make it looser.
    assert vlb_gap_bpd(lambda t: -3.0 + 6.0 * t, num_keys=2) > 0.05


def test_the_schedule_learns_to_cut_the_variance_and_stays_monotonic():
    gamma = vdm.MonotonicGamma(hidden=64, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(gamma)
    x = data(jax.random.key(0), 1024, dim=32)
    tx = optax.adam(3e-2)

    def per_example_bpd(params, key):
        g = nnx.merge(graphdef, params)
        return vdm.vlb(lambda z, t: exact_eps(z, t, g), g, x, key)["bpd"]

    @jax.jit
    def step(params, opt_state, key):
        def loss(params):
            g = nnx.merge(graphdef, params)
            return vdm.vdm_objective(lambda z, t: exact_eps(z, t, g), g, x, key)[0]
        grads = jax.grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    keys = jax.random.split(jax.random.key(5), 4)
    variance = lambda p: float(np.mean([jnp.var(per_example_bpd(p, k)) for k in keys]))  # noqa: E731
    before, opt_state = variance(params), tx.init(params)
    for i in range(80):
        params, opt_state = step(params, opt_state, jax.random.key(100 + i))
    after = variance(params)
    assert after < 0.7 * before, (before, after)
    trained = nnx.merge(graphdef, params)
    curve = trained(jnp.linspace(0.0, 1.0, 2001))
    assert bool(jnp.all(jnp.diff(curve) > 0))  # monotonic after training


def test_the_discretised_decoder_and_the_fourier_features():
    grid = jnp.arange(256) / 127.5 - 1.0  # the pipeline's 8-bit values in [-1, 1]
    x = grid[jax.random.randint(jax.random.key(0), (16, 8), 0, 256)]
    eps = jax.random.normal(jax.random.key(1), x.shape)
    sharp = vdm.reconstruction_loss(x, eps, jnp.asarray(-13.3), grid)  # σ_0 / α_0 = 0.0013 << the 0.0078 spacing
    blurred = vdm.reconstruction_loss(x, eps, jnp.asarray(-6.0), grid)
    assert float(jnp.mean(sharp)) / 8 < 0.01 < 1.0 < float(jnp.min(blurred)) / 8  # nats per dimension
    np.testing.assert_allclose(vdm.prior_loss(jnp.zeros((2, 3)), jnp.asarray(30.0)), 0.0, atol=1e-6)
    z = jnp.full((2, 4, 4, 3), 0.25)
    features = vdm.fourier_features(z)
    assert features.shape == (2, 4, 4, 3 * 5)
    angles = [2**7 * math.pi * 0.25, 2**8 * math.pi * 0.25]
    np.testing.assert_allclose(features[0, 0, 0, 3:7], [*np.sin(angles), *np.cos(angles)], atol=1e-4)
    t = vdm.antithetic_times(jax.random.key(3), 8)
    np.testing.assert_allclose(np.sort(np.asarray(t)) - np.sort(np.asarray(t))[0], np.arange(8) / 8, atol=1e-6)


def test_every_sampler_drives_a_learned_schedule_through_its_process():
    gamma = vdm.MonotonicGamma(gamma_0=-10.0, gamma_1=8.0, hidden=64, rngs=nnx.Rngs(3))
    process = vdm.LearnedVP.from_gamma(gamma)
    t = np.asarray([0.01, 0.3, 0.77, 0.999])
    alpha, sigma = process.alpha_sigma(t)
    want_alpha, want_sigma = vdm.alpha_sigma(gamma(jnp.asarray(t, jnp.float32)))
    np.testing.assert_allclose(alpha, want_alpha, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(sigma, want_sigma, rtol=1e-4)
    np.testing.assert_allclose(process.time_at_log_snr(process.log_snr(t)), t, atol=1e-6)
    drift, g = process.sde(jnp.ones((4, 1)), jnp.asarray(t, jnp.float32))  # f = d log α / dt, g² = σ² γ'
    log_alpha = lambda s: np.log(process.alpha_sigma(s)[0])  # noqa: E731
    np.testing.assert_allclose(drift[:, 0], (log_alpha(t + 1e-4) - log_alpha(t - 1e-4)) / 2e-4, rtol=2e-2)
    assert bool(jnp.all(g > 0))
    mixture = exact.ring(8, std=0.05)
    x_T = jax.random.normal(jax.random.key(0), (4000, 2))
    reference = mixture.sample(np.random.default_rng(1), 4000)
    for name, steps in (("ddim", 100), ("dpm_solver++", 20), ("heun", 30)):
        x0 = dj.samplers.get(name)(exact.x0_model(mixture, process), process, jax.random.key(1), x_T, steps=steps,
                                   prediction="x0", clip_x0=None)
        assert exact.sliced_wasserstein(np.asarray(x0), reference) < 0.06, name
