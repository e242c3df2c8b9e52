"""EDM's Euler and Heun samplers with stochastic churn (Karras et al. 2022, arXiv 2206.00364,
Algorithm 2), for models trained on a discrete variance-preserving schedule."""

import math

import jax
import jax.numpy as jnp

from diffusion_jax import diffusion, schedules
from diffusion_jax.errors import ConfigError
from diffusion_jax.samplers.chain import run_chain
from diffusion_jax.schedules import Schedule

SOLVERS = ("euler", "heun")


def edm_sample(
    model_fn: diffusion.ModelFn,
    schedule: Schedule,
    key: jax.Array,
    x_T: jax.Array,
    steps: int = 18,
    prediction: str = "eps",
    *,
    solver: str = "heun",
    spacing: str = "karras",
    rho: float = 7.0,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    clip_x0: float | None = None,
    return_trajectory: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Integrates EDM's probability-flow ODE dx~/ds = (x~ - D(x~; s)) / s (their Eq. 3 with
    sigma(t) = t) in the variance-exploding scale x~ = x / alpha, s = sigma / alpha.

    Each step i: churn s^ = s_i (1 + gamma), gamma = min(S_churn / N, sqrt(2) - 1) when
    S_tmin <= s_i <= S_tmax, adding fresh noise of std sqrt(s^2 - s_i^2) S_noise; then an
    Euler step to s_{i+1}, and for 'heun' the trapezoidal correction unless s_{i+1} = 0
    (Algorithm 2). As EDM does for discrete models (their `round_sigma`), every s the
    network sees is rounded to a training timestep. NFE: N for Euler, 2N - 1 for Heun.
    `spacing='karras'` places the N steps with rho = 7 (their Eq. 5); S_churn = 0 is the
    deterministic sampler and `key` is then unused.
    """
    if solver not in SOLVERS:
        raise ConfigError(f"sample.solver: unknown solver {solver!r}; choose one of: {', '.join(SOLVERS)}")
    steps_t = schedules.sampling_timesteps(schedule, steps, spacing, rho=rho)  # increasing
    num_steps = len(steps_t)
    denoise = diffusion.make_denoiser(model_fn, schedule, prediction, clip_x0)
    ve_sigma = schedule.sigma / schedule.alpha  # [T], increasing
    ts = jnp.asarray(steps_t, jnp.int32)
    ts_to = jnp.concatenate([jnp.zeros(1, jnp.int32), ts[:-1]])  # step 0 goes to s = 0
    s_from = ve_sigma[ts]
    s_to = jnp.concatenate([jnp.zeros(1), s_from[:-1]])
    gamma = min(s_churn / num_steps, math.sqrt(2.0) - 1.0)

    def x0_at(x_ve: jax.Array, t: jax.Array) -> jax.Array:
        """D(x~; s_t): the denoiser at training timestep t, fed x = alpha_t x~."""
        return denoise(schedule.alpha[t] * x_ve, jnp.full((x_ve.shape[0],), t, jnp.int32)).x0

    def step(x: jax.Array, state: None, i: jax.Array, key: jax.Array) -> tuple[jax.Array, None]:
        x_ve = x / schedule.alpha[ts[i]]
        s = s_from[i]
        churn = jnp.where((s >= s_tmin) & (s <= s_tmax), gamma, 0.0)
        # Round the raised sigma to a training timestep, never below the current one.
        t_hat = jnp.maximum(jnp.argmin(jnp.abs(ve_sigma - s * (1.0 + churn))), ts[i])
        s_hat = ve_sigma[t_hat]
        noise = jax.random.normal(key, x.shape, x.dtype)
        # Exactly no noise without churn (s_hat^2 - s^2 would leave an FMA rounding residue).
        churn_std = jnp.where(t_hat > ts[i], jnp.sqrt(jnp.maximum(s_hat**2 - s**2, 0.0)), 0.0)
        x_hat = x_ve + churn_std * s_noise * noise
        d = (x_hat - x0_at(x_hat, t_hat)) / s_hat
        x_next = x_hat + (s_to[i] - s_hat) * d
        if solver == "heun":
            safe_s_to = jnp.where(i > 0, s_to[i], 1.0)
            d_next = (x_next - x0_at(x_next, ts_to[i])) / safe_s_to
            x_next = jnp.where(i > 0, x_hat + (s_to[i] - s_hat) * 0.5 * (d + d_next), x_next)
        alpha_to = jnp.where(i > 0, schedule.alpha[ts_to[i]], 1.0)
        return alpha_to * x_next, None

    return run_chain(step, x_T, key, num_steps, return_trajectory)
