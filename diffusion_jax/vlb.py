"""The variational bound of a discrete-time diffusion and improved DDPM's losses.

The negative log-likelihood of 8-bit data is bounded by (Ho et al. 2020, arXiv 2006.11239, Eq. 5)

    -log p(x_0) <= L_T + sum_{t=2}^{T} L_{t-1} + L_0,
    L_T     = KL(q(x_T | x_0) || N(0, I))                      (the prior term, no parameters),
    L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t)), a KL between Gaussians,
    L_0     = -log p_theta(x_0 | x_1), a Gaussian discretised onto the 256 levels (Ho et al. §3.3, Eq. 13).

Every term here is in bits per dimension (mean over the data dimensions / ln 2), the unit of the
papers' tables. With 0-based timesteps (index i is beta_{i+1}), the term at index t is L_t for
t >= 1 and the decoder L_0 at t = 0.

The reverse step p_theta(x_{t-1} | x_t) = N(mu_theta, Sigma_theta) takes its mean from the
posterior q(x_{t-1} | x_t, x̂_0) and its variance from `variance` (the names of the DDPM sampler):
'fixed_small' (beta-tilde_t), 'fixed_large' (beta_t) or 'learned_range' (improved DDPM, Nichol &
Dhariwal 2021, arXiv 2102.09672, Eq. 15), for which the network returns [prediction, v]
concatenated on the last axis.

Improved DDPM's training losses (their §3.1 and §3.3) are here too: `hybrid_loss` (L_simple +
lambda L_vlb with the stop-gradient on the mean inside L_vlb) and `vlb_loss` with the
importance-sampled timesteps of `TimestepHistory`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import struct
from jax.scipy.special import log_ndtr

from diffusion_jax import diffusion
from diffusion_jax.errors import ConfigError
from diffusion_jax.schedules import Schedule

VARIANCES = ("fixed_small", "fixed_large", "learned_range")
LOSSES = ("simple", "hybrid", "vlb")
TIMESTEP_SAMPLING = ("uniform", "importance")

HISTORY_LENGTH = 10  # improved DDPM §3.3: the last 10 values of each L_t
UNIFORM_MIX = 0.001  # their code's LossSecondMomentResampler mixes this much of the uniform distribution in


def check_variance(variance: str) -> None:
    if variance not in VARIANCES:
        raise ConfigError(f"sample.variance: unknown variance {variance!r}; choose one of: {', '.join(VARIANCES)}")


def learned_log_variance(v: jax.Array, log_min: jax.Array, log_max: jax.Array) -> jax.Array:
    """log Sigma = u log beta_t + (1 - u) log beta-tilde_t with u = (v + 1) / 2 (iDDPM Eq. 15).

    `v` is the network's raw output (the paper's v in [0, 1] is u here: the network's output
    is mapped from [-1, 1], as in their code); log_min = log beta-tilde_t (clipped at t = 1),
    log_max = log beta_t.
    """
    frac = (v.astype(jnp.float32) + 1.0) / 2.0
    return frac * log_max + (1.0 - frac) * log_min


def normal_kl(mean1: jax.Array, log_var1: jax.Array, mean2: jax.Array, log_var2: jax.Array) -> jax.Array:
    """KL(N(mean1, e^log_var1) || N(mean2, e^log_var2)) elementwise, in nats."""
    return 0.5 * (
        -1.0 + log_var2 - log_var1 + jnp.exp(log_var1 - log_var2) + jnp.square(mean1 - mean2) * jnp.exp(-log_var2)
    )


def _log_diff_ndtr(upper: jax.Array, lower: jax.Array) -> jax.Array:
    """log(Phi(upper) - Phi(lower)) for upper > lower, accurate in both tails (by the symmetry
    Phi(u) - Phi(l) = Phi(-l) - Phi(-u), evaluated on the side where the CDFs are small)."""
    flip = lower > 0
    hi, lo = jnp.where(flip, -lower, upper), jnp.where(flip, -upper, lower)
    log_hi, log_lo = log_ndtr(hi), log_ndtr(lo)
    return log_hi + jnp.log1p(-jnp.exp(jnp.minimum(log_lo - log_hi, -1e-12)))


def discretized_gaussian_log_likelihood(
    x: jax.Array, mean: jax.Array, log_scale: jax.Array, num_bins: int = 256
) -> jax.Array:
    """log P(x) under N(mean, e^{2 log_scale}) discretised onto `num_bins` levels in [-1, 1] (Ho et al. Eq. 13).

    x lies on the grid {-1, -1 + 2/(K-1), ..., 1} (K = num_bins; data = uint8 / 127.5 - 1); its bin is
    [x - 1/(K-1), x + 1/(K-1)], extended to -inf at x = -1 and to +inf at x = 1. Elementwise, nats.
    """
    half_bin = 1.0 / (num_bins - 1)
    inv_std = jnp.exp(-log_scale)
    upper, lower = inv_std * (x - mean + half_bin), inv_std * (x - mean - half_bin)
    edge = 1.0 - half_bin / 2  # x within half a bin of +-1 is an edge level
    return jnp.where(
        x < -edge, log_ndtr(upper), jnp.where(x > edge, log_ndtr(-lower), _log_diff_ndtr(upper, lower))
    )


def _bits_per_dim(nats: jax.Array) -> jax.Array:
    """[B, ...] elementwise nats -> [B] bits per dimension."""
    return jnp.mean(nats, axis=tuple(range(1, nats.ndim))) / math.log(2.0)


def prior_bpd(schedule: Schedule, x0: jax.Array) -> jax.Array:
    """L_T = KL(q(x_T | x_0) || N(0, I)) in bits/dim, [B]; ~1e-5 for DDPM's linear schedule."""
    t = jnp.full((x0.shape[0],), schedule.num_timesteps - 1, jnp.int32)
    mean, var = diffusion.q_mean_variance(schedule, x0, t)
    return _bits_per_dim(normal_kl(mean, jnp.log(var), 0.0, 0.0))


def reverse_log_variance(
    schedule: Schedule, t: jax.Array, x_t: jax.Array, variance: str, v: jax.Array | None = None
) -> jax.Array:
    """log Sigma_theta(x_t, t) broadcast against x_t, for `variance` (v: the network's variance output).

    Follows improved DDPM's code at t = 0 (where beta-tilde_1 = 0): 'fixed_small' uses the clipped
    log beta-tilde_2 and 'fixed_large' beta-tilde_2 instead of beta_1, so the decoder L_0 has the
    same scale under both.
    """
    check_variance(variance)
    log_small = schedule.posterior_log_variance_clipped
    if variance == "fixed_small":
        return diffusion.extract(log_small, t, x_t)
    log_large = jnp.log(schedule.betas)
    if variance == "fixed_large":
        return diffusion.extract(log_large.at[0].set(log_small[0]), t, x_t)
    if v is None:
        raise ValueError("variance='learned_range' needs the network's variance output v")
    return learned_log_variance(v, diffusion.extract(log_small, t, x_t), diffusion.extract(log_large, t, x_t))


class ReverseStep(NamedTuple):
    """p_theta(x_{t-1} | x_t) = N(mean, exp(log_var)) and the x̂_0 its mean came from; [B, ...] each."""

    mean: jax.Array
    log_var: jax.Array
    x0: jax.Array


def reverse_step(
    model_out: jax.Array,
    schedule: Schedule,
    x_t: jax.Array,
    t: jax.Array,
    prediction: str,
    variance: str,
    clip_x0: float | None = None,
) -> ReverseStep:
    """The reverse transition from a network output: mu_theta is the mean of q(x_{t-1} | x_t, x̂_0)
    (Ho et al. Eq. 7 with x̂_0 from the network), Sigma_theta as `reverse_log_variance`. With
    'learned_range', `model_out` is [prediction, v] concatenated on the last axis."""
    v = None
    if variance == "learned_range":
        model_out, v = jnp.split(model_out, 2, axis=-1)
    alpha, sigma = diffusion.extract(schedule.alpha, t, x_t), diffusion.extract(schedule.sigma, t, x_t)
    x0 = diffusion.to_x0_eps(model_out, x_t, alpha, sigma, prediction, clip_x0).x0
    mean, _, _ = diffusion.q_posterior(schedule, x0, x_t, t)
    return ReverseStep(mean, reverse_log_variance(schedule, t, x_t, variance, v), x0)


def vlb_term_bpd(step: ReverseStep, schedule: Schedule, x0: jax.Array, x_t: jax.Array, t: jax.Array) -> jax.Array:
    """The bound's term at t in bits/dim, [B]: KL(q(x_{t-1} | x_t, x_0) || p_theta) for t >= 1 and the
    discretised decoder NLL -log p_theta(x_0 | x_1) at t = 0 (iDDPM's `_vb_terms_bpd`)."""
    true_mean, _, true_log_var = diffusion.q_posterior(schedule, x0, x_t, t)
    kl = _bits_per_dim(normal_kl(true_mean, true_log_var, step.mean, step.log_var))
    decoder_nll = -_bits_per_dim(discretized_gaussian_log_likelihood(x0, step.mean, 0.5 * step.log_var))
    return jnp.where(t == 0, decoder_nll, kl)


class VLB(NamedTuple):
    """The bound in bits/dim: `total` [B] = `prior` [B] + sum of `terms` [B, T] (terms[:, 0] is L_0)."""

    total: jax.Array
    prior: jax.Array
    terms: jax.Array


def vlb_bpd(
    model_fn: diffusion.ModelFn,
    schedule: Schedule,
    x0: jax.Array,
    key: jax.Array,
    *,
    prediction: str = "eps",
    variance: str = "fixed_small",
    clip_x0: float | None = None,
) -> VLB:
    """All T + 1 terms of the bound for data x0 [B, ...] on the 8-bit grid in [-1, 1] (Ho et al. Eq. 5).

    Each L_t is estimated with one draw x_t ~ q(x_t | x_0) (noise from `fold_in(key, t)`), as in
    improved DDPM's `calc_bpd_loop`; a `lax.scan` over t makes it one compiled program of T network
    calls. `clip_x0` clips x̂_0 in the reverse mean (their image_nll.py evaluates with it, 1.0).
    """
    diffusion.check_prediction(prediction)
    check_variance(variance)

    def term(_: None, t: jax.Array) -> tuple[None, jax.Array]:
        t_b = jnp.full((x0.shape[0],), t, jnp.int32)
        noise = jax.random.normal(jax.random.fold_in(key, t), x0.shape, x0.dtype)
        x_t = diffusion.q_sample(schedule, x0, t_b, noise)
        step = reverse_step(model_fn(x_t, t_b), schedule, x_t, t_b, prediction, variance, clip_x0)
        return None, vlb_term_bpd(step, schedule, x0, x_t, t_b)

    _, terms = jax.lax.scan(term, None, jnp.arange(schedule.num_timesteps, dtype=jnp.int32))
    terms = terms.T  # [B, T]
    prior = prior_bpd(schedule, x0)
    return VLB(prior + jnp.sum(terms, axis=1), prior, terms)


# --- improved DDPM's training losses ------------------------------------------------------


@struct.dataclass
class TimestepHistory:
    """The last `HISTORY_LENGTH` values of each L_t seen in training (iDDPM §3.3), for importance sampling.

    losses: float32 [T, 10], oldest first; counts: int32 [T], how many values each row holds (<= 10).
    """

    losses: jax.Array
    counts: jax.Array

    @classmethod
    def create(cls, num_timesteps: int) -> TimestepHistory:
        return cls(jnp.zeros((num_timesteps, HISTORY_LENGTH), jnp.float32), jnp.zeros((num_timesteps,), jnp.int32))

    def probabilities(self) -> jax.Array:
        """p_t ∝ sqrt(E[L_t^2]) over the history, mixed with 0.1% uniform; uniform until every t has 10
        values (iDDPM §3.3 and their LossSecondMomentResampler). float32 [T]."""
        num_timesteps = self.counts.shape[0]
        uniform = jnp.full((num_timesteps,), 1.0 / num_timesteps)
        weights = jnp.sqrt(jnp.mean(jnp.square(self.losses), axis=1))
        weights = weights / jnp.sum(weights) * (1.0 - UNIFORM_MIX) + UNIFORM_MIX / num_timesteps
        return jnp.where(jnp.all(self.counts == HISTORY_LENGTH), weights, uniform)

    def update(self, t: jax.Array, losses: jax.Array) -> TimestepHistory:
        """Appends losses [B] at timesteps t [B], in batch order (a full row drops its oldest value)."""

        def push(history: TimestepHistory, t_loss: tuple[jax.Array, jax.Array]) -> tuple[TimestepHistory, None]:
            t_i, loss = t_loss
            count = history.counts[t_i]
            row = history.losses[t_i]
            row = jnp.where(count == HISTORY_LENGTH, jnp.roll(row, -1).at[-1].set(loss), row.at[count].set(loss))
            new = history.replace(
                losses=history.losses.at[t_i].set(row),
                counts=history.counts.at[t_i].set(jnp.minimum(count + 1, HISTORY_LENGTH)),
            )
            return new, None

        history, _ = jax.lax.scan(push, self, (t, jax.lax.stop_gradient(losses).astype(jnp.float32)))
        return history


def _vlb_terms_with_frozen_mean(
    model_out: jax.Array, schedule: Schedule, x0: jax.Array, x_t: jax.Array, t: jax.Array, prediction: str,
    freeze_mean: bool,
) -> jax.Array:
    """L_t in bits/dim [B] from a learned-range output [prediction, v]; with `freeze_mean`, gradients reach
    only v (iDDPM §3.1)."""
    out, v = jnp.split(model_out.astype(jnp.float32), 2, axis=-1)
    if freeze_mean:
        out = jax.lax.stop_gradient(out)
    step = reverse_step(jnp.concatenate([out, v], axis=-1), schedule, x_t, t, prediction, "learned_range")
    return vlb_term_bpd(step, schedule, x0, x_t, t)


def hybrid_loss(
    model_fn: diffusion.ModelFn,
    schedule: Schedule,
    x0: jax.Array,
    key: jax.Array,
    *,
    prediction: str = "eps",
    vlb_weight: float = 0.001,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """L_hybrid = L_simple + lambda L_vlb (iDDPM §3.1), lambda = `vlb_weight` (0.001 in the paper).

    The network outputs [prediction, v]. With t ~ U{0..T-1}, T L_t is a one-sample estimate of
    L_vlb = sum_t L_t, so the per-example loss is mse + lambda T L_t; the mean inside L_t is
    stop-gradiented, so L_vlb trains only the variance and L_simple the mean. (Their code's
    `vb * num_timesteps / 1000` for RESCALED_MSE is this with lambda = 0.001.)
    """
    t, noise, x_t = diffusion.noise_at_random_times(schedule, x0, key)
    alpha, sigma = diffusion.extract(schedule.alpha, t, x0), diffusion.extract(schedule.sigma, t, x0)
    model_out = model_fn(x_t, t)
    out = jnp.split(model_out.astype(jnp.float32), 2, axis=-1)[0]
    target = diffusion.training_target(x0, noise, alpha, sigma, prediction)
    mse = jnp.mean(jnp.square(out - target), axis=tuple(range(1, x0.ndim)))
    vlb_t = _vlb_terms_with_frozen_mean(model_out, schedule, x0, x_t, t, prediction, freeze_mean=True)
    loss = mse + vlb_weight * schedule.num_timesteps * vlb_t
    return jnp.mean(loss), {"t": t, "mse": mse, "vlb": vlb_t}


def vlb_loss(
    model_fn: diffusion.ModelFn,
    schedule: Schedule,
    x0: jax.Array,
    key: jax.Array,
    *,
    prediction: str = "eps",
    history: TimestepHistory | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """L_vlb = sum_t L_t alone, trained directly (iDDPM §3.3), in bits/dim; the network outputs [prediction, v].

    t ~ p_t and the loss L_t / p_t is an unbiased estimate of L_vlb (less the constant prior
    term): p_t uniform without `history`, else `history.probabilities()` (importance sampling,
    p_t ∝ sqrt(E[L_t^2]), which the paper finds necessary for L_vlb to train well). The caller
    updates the history with the returned per-example `vlb` at `t`.
    """
    t_key, noise_key = jax.random.split(key)
    num_timesteps = schedule.num_timesteps
    if history is None:
        t = diffusion.sample_timesteps(t_key, x0.shape[0], num_timesteps)
        inv_prob = jnp.full(t.shape, float(num_timesteps))
    else:
        probs = history.probabilities()
        t = jax.random.choice(t_key, num_timesteps, (x0.shape[0],), p=probs).astype(jnp.int32)
        inv_prob = 1.0 / probs[t]
    noise = jax.random.normal(noise_key, x0.shape, x0.dtype)
    x_t = diffusion.q_sample(schedule, x0, t, noise)
    vlb_t = _vlb_terms_with_frozen_mean(model_fn(x_t, t), schedule, x0, x_t, t, prediction, freeze_mean=False)
    return jnp.mean(vlb_t * inv_prob), {"t": t, "vlb": vlb_t}


def check_loss(loss: str, timestep_sampling: str, learn_sigma: bool) -> None:
    """The loss fields must fit together: a learned variance needs a loss that trains it, and the
    variance term of 'hybrid' trains only a learned variance."""
    if loss not in LOSSES:
        raise ConfigError(f"diffusion.loss: unknown loss {loss!r}; choose one of: {', '.join(LOSSES)}")
    if timestep_sampling not in TIMESTEP_SAMPLING:
        raise ConfigError(
            f"diffusion.timestep_sampling: unknown sampling {timestep_sampling!r}; "
            f"choose one of: {', '.join(TIMESTEP_SAMPLING)}"
        )
    if learn_sigma and loss == "simple":
        raise ConfigError("model.learn_sigma: L_simple does not train the variance; set diffusion.loss='hybrid' "
                          "or 'vlb' (improved DDPM), or model.learn_sigma=False")
    if loss in ("hybrid", "vlb") and not learn_sigma:
        raise ConfigError(f"diffusion.loss: '{loss}' trains improved DDPM's learned variance; set "
                          "model.learn_sigma=True (or diffusion.loss='simple')")
    if timestep_sampling == "importance" and loss != "vlb":
        raise ConfigError("diffusion.timestep_sampling: 'importance' is improved DDPM's sampler for "
                          f"diffusion.loss='vlb' (got {loss!r}); use 'uniform'")
