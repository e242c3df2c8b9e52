"""The forward process, its posterior, parameterisations and the training loss.

Notation (DESIGN §4): x_t = alpha_t x_0 + sigma_t eps, with alpha_t^2 = alpha-bar_t and
sigma_t^2 = 1 - alpha-bar_t for the variance-preserving discrete schedules of
`schedules.py`. The conversions between eps, x_0, v and the score are written in
(alpha, sigma) alone, so continuous-time processes reuse them unchanged.

Every function here is pure and works on arrays of any shape [B, ...].
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from diffusion_jax.errors import ConfigError
from diffusion_jax.schedules import Schedule

PREDICTIONS = ("eps", "x0", "v", "velocity")  # what a network can be trained to predict
MODEL_OUTPUTS = PREDICTIONS + ("score",)  # what samplers accept (NCSN / score_sde networks output a score)
WEIGHTINGS = ("none", "snr", "truncated_snr", "snr_plus_one", "min_snr")

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x_t [B,...], t [B]) -> prediction


def per_example(values: jax.Array, x: jax.Array) -> jax.Array:
    """Reshapes per-example values [B] to broadcast against x [B, ...]: [B, 1, ...]."""
    return jnp.reshape(values, values.shape + (1,) * (x.ndim - values.ndim))


def extract(array: jax.Array, t: jax.Array, x: jax.Array) -> jax.Array:
    """array[t] shaped to broadcast against x: [T], [B] int, [B, ...] -> [B, 1, ...]."""
    return per_example(array[t], x)


# --- forward process and posterior -------------------------------------------------------


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """Samples q(x_t | x_0) = N(sqrt(alpha-bar_t) x_0, (1 - alpha-bar_t) I) (Ho et al. Eq. 4).

    x0, noise: [B, ...]; t: int32 [B], 0-based (index 0 is beta_1).
    """
    return extract(schedule.alpha, t, x0) * x0 + extract(schedule.sigma, t, x0) * noise


def q_mean_variance(schedule: Schedule, x0: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean [B, ...] and variance [B, 1, ...] of q(x_t | x_0) (Ho et al. Eq. 4)."""
    return extract(schedule.alpha, t, x0) * x0, extract(jnp.square(schedule.sigma), t, x0)


def q_posterior(
    schedule: Schedule, x0: jax.Array, x_t: jax.Array, t: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0) (Ho et al. Eqs. 6-7).

    mu-tilde = coef1 x_0 + coef2 x_t, beta-tilde = beta_t (1 - alpha-bar_{t-1}) / (1 - alpha-bar_t).
    """
    mean = extract(schedule.posterior_mean_coef1, t, x_t) * x0
    mean = mean + extract(schedule.posterior_mean_coef2, t, x_t) * x_t
    var = extract(schedule.posterior_variance, t, x_t)
    log_var = extract(schedule.posterior_log_variance_clipped, t, x_t)
    return mean, var, log_var


# --- parameterisations (Salimans & Ho 2022 for v; Song et al. 2021 for the score) --------


def x0_from_eps(x_t: jax.Array, eps: jax.Array, alpha: jax.Array, sigma: jax.Array) -> jax.Array:
    """x_0 = (x_t - sigma eps) / alpha."""
    return (x_t - sigma * eps) / alpha


def eps_from_x0(x_t: jax.Array, x0: jax.Array, alpha: jax.Array, sigma: jax.Array) -> jax.Array:
    """eps = (x_t - alpha x_0) / sigma."""
    return (x_t - alpha * x0) / sigma


def v_from_x0_eps(x0: jax.Array, eps: jax.Array, alpha: jax.Array, sigma: jax.Array) -> jax.Array:
    """v = alpha eps - sigma x_0 (Salimans & Ho 2022, arXiv 2202.00512, §4)."""
    return alpha * eps - sigma * x0


def x0_from_v(x_t: jax.Array, v: jax.Array, alpha: jax.Array, sigma: jax.Array) -> jax.Array:
    """x_0 = (alpha x_t - sigma v) / (alpha^2 + sigma^2); alpha x_t - sigma v when variance-preserving."""
    return (alpha * x_t - sigma * v) / (alpha**2 + sigma**2)


def eps_from_v(x_t: jax.Array, v: jax.Array, alpha: jax.Array, sigma: jax.Array) -> jax.Array:
    """eps = (sigma x_t + alpha v) / (alpha^2 + sigma^2); sigma x_t + alpha v when variance-preserving."""
    return (sigma * x_t + alpha * v) / (alpha**2 + sigma**2)


def score_from_eps(eps: jax.Array, sigma: jax.Array) -> jax.Array:
    """grad_x log q(x_t) = -eps / sigma (Song et al. 2021, arXiv 2011.13456, Eq. 3 / App. B)."""
    return -eps / sigma


def eps_from_score(score: jax.Array, sigma: jax.Array) -> jax.Array:
    """eps = -sigma * score."""
    return -sigma * score


class Prediction(NamedTuple):
    """A denoiser's output at (x_t, t): both x_0 and eps estimates, [B, ...] each."""

    x0: jax.Array
    eps: jax.Array


def to_x0_eps(
    model_out: jax.Array,
    x_t: jax.Array,
    alpha: jax.Array,
    sigma: jax.Array,
    prediction: str,
    clip_x0: float | None = None,
) -> Prediction:
    """Converts a network output of kind `prediction` ('eps' | 'x0' | 'v' | 'score' | 'velocity') to (x_0, eps).

    alpha, sigma broadcast against x_t (e.g. [B, 1, 1, 1] or scalars); any Gaussian process
    x_t = alpha x_0 + sigma eps, variance-preserving or not. With `clip_x0`, x̂_0 is clipped
    to [-clip_x0, clip_x0] and eps recomputed from it (Ho et al.'s sampling code).
    """
    check_prediction(prediction, MODEL_OUTPUTS)
    if prediction == "eps":
        pred = Prediction(x0_from_eps(x_t, model_out, alpha, sigma), model_out)
    elif prediction == "x0":
        pred = Prediction(model_out, eps_from_x0(x_t, model_out, alpha, sigma))
    elif prediction == "score":
        eps = eps_from_score(model_out, sigma)
        pred = Prediction(x0_from_eps(x_t, eps, alpha, sigma), eps)
    elif prediction == "velocity":  # u = eps - x_0 of the linear interpolant, alpha + sigma = 1 (`sde.Flow`)
        pred = Prediction(x_t - sigma * model_out, x_t + alpha * model_out)
    else:
        pred = Prediction(x0_from_v(x_t, model_out, alpha, sigma), eps_from_v(x_t, model_out, alpha, sigma))
    if clip_x0 is not None:
        x0 = jnp.clip(pred.x0, -clip_x0, clip_x0)
        pred = Prediction(x0, eps_from_x0(x_t, x0, alpha, sigma))
    return pred


def make_denoiser(
    model_fn: ModelFn, schedule: Schedule, prediction: str, clip_x0: float | None = None
) -> Callable[[jax.Array, jax.Array], Prediction]:
    """Wraps a network into `denoise(x_t, t) -> Prediction(x0, eps)` (DESIGN §4 'Denoiser').

    `t` indexes `schedule` (int32 [B]); the network is called with the original
    training timestep `schedule.timesteps[t]`, so a respaced schedule drives a
    network trained on the full one. With `clip_x0`, x̂_0 is clipped to
    [-clip_x0, clip_x0] and eps recomputed from it (Ho et al.'s sampling code).
    """
    check_prediction(prediction, MODEL_OUTPUTS)

    def denoise(x_t: jax.Array, t: jax.Array) -> Prediction:
        alpha, sigma = extract(schedule.alpha, t, x_t), extract(schedule.sigma, t, x_t)
        return to_x0_eps(model_fn(x_t, schedule.timesteps[t]), x_t, alpha, sigma, prediction, clip_x0)

    return denoise


# (denoise, x_t, α_t, σ_t) -> new x̂_0, with α_t and σ_t [B, 1, ...] per example
X0Change = Callable[[Callable[[jax.Array], jax.Array], jax.Array, jax.Array, jax.Array], jax.Array]


def with_x0(model_fn: ModelFn, process: Any, prediction: str, change: X0Change) -> ModelFn:
    """`model_fn(x_t, t)` of the same `prediction` kind whose x̂_0 is `change(denoise, x_t, α_t, σ_t)`, where
    `denoise(x)` is the network's x̂_0 at x (at this call's t) and `process.alpha_sigma(t)` gives (α_t, σ_t): the
    form of the denoiser transforms that condition x̂_0 (`inverse.posterior_denoiser`,
    `inpaint.conditional_denoiser`, `super_resolution.consistent_denoiser`); ε̂ is recomputed from the new x̂_0."""
    check_prediction(prediction)

    def transformed(x_t: jax.Array, t: jax.Array) -> jax.Array:
        alpha, sigma = (per_example(c, x_t) for c in process.alpha_sigma(t))

        def denoise(x: jax.Array) -> jax.Array:
            return to_x0_eps(model_fn(x, t), x, alpha, sigma, prediction).x0

        x0 = change(denoise, x_t, alpha, sigma)
        return training_target(x0, eps_from_x0(x_t, x0, alpha, sigma), alpha, sigma, prediction).astype(x_t.dtype)

    return transformed


def check_prediction(prediction: str, allowed: tuple[str, ...] = PREDICTIONS) -> None:
    if prediction not in allowed:
        raise ConfigError(
            f"diffusion.prediction: unknown prediction {prediction!r}; choose one of: {', '.join(allowed)}"
        )


# --- training loss ------------------------------------------------------------------------


def sample_timesteps(key: jax.Array, batch_size: int, num_timesteps: int) -> jax.Array:
    """t ~ Uniform{0, ..., T-1}, int32 [B] (Ho et al. Algorithm 1, 0-based)."""
    return jax.random.randint(key, (batch_size,), 0, num_timesteps, dtype=jnp.int32)


def noise_at_random_times(schedule: Schedule, x0: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(t ~ U{0..T-1} int32 [B], eps ~ N(0, I), x_t = q_sample(x0, t, eps)), Ho et al. Algorithm 1 lines 3-4."""
    t_key, noise_key = jax.random.split(key)
    t = sample_timesteps(t_key, x0.shape[0], schedule.num_timesteps)
    noise = jax.random.normal(noise_key, x0.shape, x0.dtype)
    return t, noise, q_sample(schedule, x0, t, noise)


def loss_weight(log_snr: jax.Array, prediction: str, weighting: str, min_snr_gamma: float = 5.0) -> jax.Array:
    """Per-example weight on the MSE of the `prediction` target, shape of log_snr.

    Weightings are defined on the x_0-space error ||x̂_0 - x_0||^2 and converted to
    the target's error, using ||eps-err||^2 = SNR ||x0-err||^2 and
    ||v-err||^2 = (SNR + 1) ||x0-err||^2:
      - 'none': the target's plain MSE (L_simple of Ho et al. Eq. 14 for eps);
      - 'snr': x_0 weight SNR, i.e. the eps-MSE whatever the target;
      - 'truncated_snr': x_0 weight max(SNR, 1) (Salimans & Ho 2022, §4);
      - 'snr_plus_one': x_0 weight SNR + 1, i.e. the v-MSE whatever the target (Salimans & Ho 2022, §4);
      - 'min_snr': x_0 weight min(SNR, gamma) (Min-SNR-gamma, Hang et al. 2023, arXiv 2303.09556).
    """
    check_prediction(prediction)
    check_weighting(weighting)
    if weighting == "none":
        return jnp.ones_like(log_snr)
    snr = jnp.exp(log_snr)
    # ||target error||² / ||x0 error||²; for the flow's velocity 1 / sigma² = (1 + sqrt(SNR))² as alpha + sigma = 1.
    target_factor = {"eps": snr, "x0": jnp.ones_like(snr), "v": snr + 1.0,
                     "velocity": jnp.square(1.0 + jnp.exp(0.5 * log_snr))}[prediction]
    if weighting == "snr":
        x0_weight = snr
    elif weighting == "truncated_snr":
        x0_weight = jnp.maximum(snr, 1.0)
    elif weighting == "snr_plus_one":
        x0_weight = snr + 1.0
    else:  # min_snr
        x0_weight = jnp.minimum(snr, min_snr_gamma)
    return x0_weight / target_factor


def check_weighting(weighting: str) -> None:
    if weighting not in WEIGHTINGS:
        raise ConfigError(
            f"diffusion.loss_weighting: unknown weighting {weighting!r}; choose one of: {', '.join(WEIGHTINGS)}"
        )


def training_target(x0: jax.Array, noise: jax.Array, alpha: jax.Array, sigma: jax.Array, prediction: str) -> jax.Array:
    """What a network of kind `prediction` should output at x_t = alpha x0 + sigma noise."""
    check_prediction(prediction)
    if prediction == "eps":
        return noise
    if prediction == "x0":
        return x0
    if prediction == "velocity":
        return noise - x0
    return v_from_x0_eps(x0, noise, alpha, sigma)


def simple_loss(
    model_fn: ModelFn,
    schedule: Schedule,
    x0: jax.Array,
    key: jax.Array,
    *,
    prediction: str = "eps",
    weighting: str = "none",
    min_snr_gamma: float = 5.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """L_simple (Ho et al. Eq. 14, Algorithm 1) with a selectable target and weighting.

    Draws t ~ U{0..T-1} and eps ~ N(0, I), forms x_t by `q_sample`, and returns the
    batch mean of w(t) * mean_over_dims((f(x_t, t) - target)^2), together with
    per-example terms ({'t': [B], 'mse': [B]}) for logging.
    """
    t, noise, x_t = noise_at_random_times(schedule, x0, key)
    target = training_target(x0, noise, extract(schedule.alpha, t, x0), extract(schedule.sigma, t, x0), prediction)
    out = model_fn(x_t, t)
    mse = jnp.mean(jnp.square(out.astype(jnp.float32) - target), axis=tuple(range(1, x0.ndim)))
    weight = loss_weight(schedule.log_snr[t], prediction, weighting, min_snr_gamma)
    return jnp.mean(weight * mse), {"t": t, "mse": mse}
