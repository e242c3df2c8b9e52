"""The variational bound (Ho et al. Eq. 5) and improved DDPM's losses, against closed forms.

For 1-D Gaussian data x_0 ~ N(mu, s^2) every distribution in the chain is Gaussian, so the exact
reverse process q(x_{t-1} | x_t) and each term's expectation over x_t ~ q(x_t | x_0) have closed
forms; the exact reverse variance is representable as a 'learned_range' output.
"""

import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from diffusion_jax import schedules, vlb
from diffusion_jax.errors import ConfigError

MU, S = 0.3, 0.5  # the data distribution N(MU, S^2)


def exact_reverse(schedule):
    """(model_fn, mean coefficients, variance) of the exact reverse process for N(MU, S^2) data.

    E[x_0 | x_t] = MU + k_t (x_t - alpha_t MU) with k_t = alpha_t S^2 / (alpha_t^2 S^2 + sigma_t^2); the
    reverse mean is the posterior mean at that x̂_0 and Var[x_{t-1} | x_t] = beta-tilde_t + c1_t^2 Var[x_0 | x_t].
    The network returns [eps from E[x_0 | x_t], v] with v giving that variance in iDDPM's Eq. 15.
    """
    a = np.asarray(schedule.alpha, np.float64)
    sg = np.asarray(schedule.sigma, np.float64)
    c1 = np.asarray(schedule.posterior_mean_coef1, np.float64)
    c2 = np.asarray(schedule.posterior_mean_coef2, np.float64)
    k = a * S**2 / (a**2 * S**2 + sg**2)
    post_var_x0 = S**2 * sg**2 / (a**2 * S**2 + sg**2)
    var = np.asarray(schedule.posterior_variance, np.float64) + c1**2 * post_var_x0
    log_small = np.asarray(schedule.posterior_log_variance_clipped, np.float64)
    log_large = np.log(np.asarray(schedule.betas, np.float64))
    v = 2.0 * (np.log(var) - log_small) / (log_large - log_small) - 1.0
    k_j, a_j, s_j, v_j = (jnp.asarray(z, jnp.float32) for z in (k, a, sg, v))

    def model_fn(x_t, t):
        x0 = MU + k_j[t][:, None] * (x_t - a_j[t][:, None] * MU)
        eps = (x_t - a_j[t][:, None] * x0) / s_j[t][:, None]
        return jnp.concatenate([eps, jnp.broadcast_to(v_j[t][:, None], x_t.shape)], axis=-1)

    # reverse mean m_t(x_t) = c1 (MU + k (x_t - a MU)) + c2 x_t = offset + slope x_t
    return model_fn, c1 * (MU - k * a * MU), c1 * k + c2, var


def expected_terms(schedule, x0):
    """E over x_t ~ q(x_t | x_0) of each KL term (nats), the continuous decoder NLL and the prior KL."""
    a = np.asarray(schedule.alpha, np.float64)
    sg = np.asarray(schedule.sigma, np.float64)
    c1 = np.asarray(schedule.posterior_mean_coef1, np.float64)
    c2 = np.asarray(schedule.posterior_mean_coef2, np.float64)
    post_var = np.asarray(schedule.posterior_variance, np.float64)
    _, offset, slope, var = exact_reverse(schedule)
    # residual = (c1 x0 + c2 x_t) - (offset + slope x_t), x_t = a x0 + sg eps
    mean_res = c1 * x0 + (c2 - slope) * a * x0 - offset
    sq_res = mean_res**2 + ((c2 - slope) * sg) ** 2
    kl = 0.5 * (np.log(var / np.maximum(post_var, 1e-300)) + post_var / var - 1.0 + sq_res / var)
    # decoder at index 0: E[-log N(x0; offset + slope x_1, var_1)], with the model's variance at 0
    dec_res = (x0 - offset[0] - slope[0] * a[0] * x0) ** 2 + (slope[0] * sg[0]) ** 2
    decoder = 0.5 * (math.log(2 * math.pi * var[0]) + dec_res / var[0])
    aT, sT = a[-1], sg[-1]
    prior = 0.5 * (sT**2 + (aT * x0) ** 2 - 1.0 - math.log(sT**2))
    return kl[1:], decoder, prior


def expected_decoder_bits(schedule, x0):
    """E over x_1 ~ q(x_1 | x_0) of -log2 P(x0's 8-bit bin | x_1) under the exact reverse step (Gauss-Hermite)."""
    _, offset, slope, var = exact_reverse(schedule)
    a0, s0 = float(schedule.alpha[0]), float(schedule.sigma[0])
    nodes, weights = np.polynomial.hermite_e.hermegauss(64)
    means = offset[0] + slope[0] * (a0 * x0 + s0 * nodes)
    probs = stats.norm.cdf(x0 + 1 / 255, means, np.sqrt(var[0])) - stats.norm.cdf(x0 - 1 / 255, means, np.sqrt(var[0]))
    # the outermost nodes lie ~10 sd out, where probs underflows but the weights are ~1e-20
    return float(np.sum(weights * -np.log2(np.maximum(probs, 1e-300))) / np.sqrt(2 * np.pi))


def float64_schedule(num_timesteps):
    """The cosine schedule's arrays in float64 (the library's are float32), for the closed forms."""
    betas = schedules.cosine_betas(num_timesteps)
    ac = np.cumprod(1.0 - betas)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    return types.SimpleNamespace(
        betas=betas, alpha=np.sqrt(ac), sigma=np.sqrt(1.0 - ac), posterior_variance=post_var,
        posterior_log_variance_clipped=np.log(np.append(post_var[1], post_var[1:])),
        posterior_mean_coef1=betas * np.sqrt(ac_prev) / (1.0 - ac),
        posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(1.0 - betas) / (1.0 - ac),
    )


def model_marginal_nll(schedule, x0):
    """-log p_theta(x0) of the exact reverse chain started from N(0, 1): a linear-Gaussian chain."""
    _, offset, slope, var = exact_reverse(schedule)
    mean, variance = 0.0, 1.0
    for t in reversed(range(len(var))):
        mean, variance = offset[t] + slope[t] * mean, slope[t] ** 2 * variance + var[t]
    return -stats.norm.logpdf(x0, mean, math.sqrt(variance))


@pytest.mark.parametrize("x0", [-1.0, 0.3, 1.2])
def test_exact_reverse_bound_is_above_nll_and_tightens_with_more_steps(x0):
    """The bound >= -log p_theta(x0) (Jensen) with a gap that vanishes as T grows; p_theta -> q as well.

    The exact reverse chain differs from q only in its prior N(0, 1) vs q(x_T) (the cosine schedule
    leaves alpha_T = 0.005 at T = 10), so -log p_theta(x0) need not exceed the data's -log q(x0).
    """
    data_nll = -stats.norm.logpdf(x0, MU, S)
    gaps, errors = [], []
    for num_timesteps in (10, 100, 1000):
        schedule = float64_schedule(num_timesteps)
        kl, decoder, prior = expected_terms(schedule, x0)
        bound = kl.sum() + decoder + prior
        model_nll = model_marginal_nll(schedule, x0)
        gaps.append(bound - model_nll)
        errors.append(abs(bound - data_nll))
    assert min(gaps) > 0
    assert gaps[0] > 50 * gaps[1] > 2500 * gaps[2]  # measured: falls as 1/T^2 for Gaussian data
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-8


@pytest.fixture(scope="module")
def small_schedule():
    return schedules.cosine(20)


def test_vlb_bpd_terms_match_their_expectations(small_schedule):
    """vlb_bpd's Monte-Carlo KL terms average to the closed-form expectations; the prior is exact."""
    model_fn, *_ = exact_reverse(small_schedule)
    x0 = jnp.full((4096, 1), 0.4, jnp.float32)
    out = jax.jit(lambda x, k: vlb.vlb_bpd(model_fn, small_schedule, x, k, variance="learned_range"))(
        x0, jax.random.key(0)
    )
    kl, _, prior = expected_terms(small_schedule, 0.4)
    assert out.terms.shape == (4096, 20)
    np.testing.assert_allclose(np.mean(np.asarray(out.terms), axis=0)[1:], kl / math.log(2), rtol=0.05, atol=1e-4)
    np.testing.assert_allclose(np.asarray(out.prior), prior / math.log(2), rtol=1e-4)
    np.testing.assert_allclose(out.total, out.prior + out.terms.sum(axis=1), rtol=1e-6)


def test_discretized_gaussian_matches_the_bin_probabilities():
    grid = np.linspace(-1, 1, 256)
    mean, scale = 0.2, 0.05
    got = np.exp(np.asarray(vlb.discretized_gaussian_log_likelihood(jnp.asarray(grid), mean, math.log(scale))))
    edges = np.concatenate([[-np.inf], (grid[:-1] + grid[1:]) / 2, [np.inf]])
    want = np.diff(stats.norm.cdf(edges, mean, scale))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-10)
    assert abs(got.sum() - 1.0) < 1e-5
    # far in a tail the log-probability stays finite and accurate
    tail = vlb.discretized_gaussian_log_likelihood(jnp.asarray(0.5), 0.0, math.log(0.01))
    want_tail = stats.norm.logsf(0.5 - 1 / 255, 0.0, 0.01) + np.log1p(
        -np.exp(stats.norm.logsf(0.5 + 1 / 255, 0.0, 0.01) - stats.norm.logsf(0.5 - 1 / 255, 0.0, 0.01))
    )
    np.testing.assert_allclose(float(tail), want_tail, rtol=1e-3)


def test_normal_kl_matches_scipy_integration():
    m1, v1, m2, v2 = 0.3, 0.4, -0.2, 0.9
    x = np.linspace(-10, 10, 200001)
    p = stats.norm.pdf(x, m1, np.sqrt(v1))
    want = np.trapezoid(p * (stats.norm.logpdf(x, m1, np.sqrt(v1)) - stats.norm.logpdf(x, m2, np.sqrt(v2))), x)
    np.testing.assert_allclose(float(vlb.normal_kl(m1, np.log(v1), m2, np.log(v2))), want, rtol=1e-6)


def test_learned_range_endpoints_are_the_fixed_variances(small_schedule):
    t = jnp.arange(20, dtype=jnp.int32)
    x = jnp.zeros((20, 1))
    small = vlb.reverse_log_variance(small_schedule, t, x, "fixed_small")
    low = vlb.reverse_log_variance(small_schedule, t, x, "learned_range", -jnp.ones((20, 1)))
    high = vlb.reverse_log_variance(small_schedule, t, x, "learned_range", jnp.ones((20, 1)))
    np.testing.assert_allclose(low, small, rtol=1e-6)
    np.testing.assert_allclose(high[:, 0], np.log(small_schedule.betas), rtol=1e-6)


def test_hybrid_loss_stops_the_gradient_of_the_mean_inside_the_vlb(small_schedule):
    """d L_hybrid / d(mean output) comes from L_simple alone; the variance output gets only L_vlb's gradient."""
    x0 = jax.random.uniform(jax.random.key(1), (8, 3), minval=-1, maxval=1)
    shift = jnp.zeros((8, 6))

    def loss(shift, vlb_weight):
        return vlb.hybrid_loss(lambda x, t: shift, small_schedule, x0, jax.random.key(2), vlb_weight=vlb_weight)[0]

    with_vlb = jax.grad(loss)(shift, 0.001)
    without = jax.grad(loss)(shift, 0.0)
    np.testing.assert_allclose(with_vlb[:, :3], without[:, :3], rtol=1e-6)  # the mean: L_simple only
    assert np.all(np.asarray(without[:, 3:]) == 0) and np.any(np.asarray(with_vlb[:, 3:]) != 0)


def test_importance_sampling_history_and_unbiased_weights():
    history = vlb.TimestepHistory.create(4)
    np.testing.assert_allclose(history.probabilities(), 0.25)  # uniform until every row is full
    t = jnp.asarray([0, 1, 2, 3] * 10 + [3], jnp.int32)
    losses = jnp.asarray([1.0, 2.0, 4.0, 8.0] * 10 + [100.0])
    history = jax.jit(vlb.TimestepHistory.update)(history, t, losses)
    np.testing.assert_array_equal(history.counts, [10, 10, 10, 10])
    assert float(history.losses[3, -1]) == 100.0 and float(history.losses[3, 0]) == 8.0  # oldest dropped
    rms = np.sqrt(np.mean(np.square(np.asarray(history.losses)), axis=1))
    want = rms / rms.sum() * (1 - vlb.UNIFORM_MIX) + vlb.UNIFORM_MIX / 4
    np.testing.assert_allclose(history.probabilities(), want, rtol=1e-6)


def test_vlb_loss_with_importance_sampling_is_unbiased(small_schedule):
    """E_{t~p}[L_t / p_t] = sum_t L_t = E_{t~U}[T L_t] for any p: both estimators agree with the exact sum."""
    model_fn, *_ = exact_reverse(small_schedule)
    x0 = jnp.full((200_000, 1), 0.4, jnp.float32)  # the estimate's sd is ~1% at this size
    skewed = vlb.TimestepHistory(  # p_t falls from ~0.095 at t = 0 to ~0.005 at t = 19
        losses=jnp.tile(jnp.linspace(20.0, 1.0, 20)[:, None], (1, 10)), counts=jnp.full((20,), 10, jnp.int32)
    )
    kl, _, _ = expected_terms(small_schedule, 0.4)
    want = kl.sum() / math.log(2) + expected_decoder_bits(small_schedule, 0.4)
    loss_fn = jax.jit(lambda x, k, h: vlb.vlb_loss(model_fn, small_schedule, x, k, history=h)[0])
    for history in (None, skewed):
        np.testing.assert_allclose(float(loss_fn(x0, jax.random.key(3), history)), want, rtol=0.05)


def test_loss_fields_are_checked():
    with pytest.raises(ConfigError, match="diffusion.loss: unknown"):
        vlb.check_loss("kl", "uniform", True)
    with pytest.raises(ConfigError, match="model.learn_sigma"):
        vlb.check_loss("simple", "uniform", True)
    with pytest.raises(ConfigError, match="set model.learn_sigma=True"):
        vlb.check_loss("hybrid", "uniform", False)
    with pytest.raises(ConfigError, match="diffusion.timestep_sampling"):
        vlb.check_loss("hybrid", "importance", True)
    vlb.check_loss("vlb", "importance", True)
