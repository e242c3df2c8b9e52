"""EDM's Euler and Heun samplers with stochastic churn (Karras et al. 2022, arXiv 2206.00364,
Algorithm 2), on discrete schedules and continuous processes alike."""

import math

import jax
import jax.numpy as jnp

from diffusion_jax import diffusion
from diffusion_jax.errors import ConfigError
from diffusion_jax.samplers.chain import ChainEdit, SampleInfo, run_chain
from diffusion_jax.samplers.levels import NoiseProcess, f32, noise_levels
from diffusion_jax.schedules import Schedule

SOLVERS = ("euler", "heun")


def _raised_level(process: NoiseProcess, t: jax.Array, alpha: jax.Array, s: jax.Array, s_target: jax.Array):
    """(t^, alpha^, s^): the level whose scale s = sigma / alpha is s_target, never below s.

    A discrete schedule rounds to its nearest training timestep, as EDM's `round_sigma` does
    for discrete models; a continuous process is evaluated exactly at the target.
    """
    if isinstance(process, Schedule):
        table = process.sigma / process.alpha  # [T], increasing
        index = jnp.argmin(jnp.abs(table - s_target))
        raised = process.timesteps[index] > t
        return (
            jnp.where(raised, process.timesteps[index], t),
            jnp.where(raised, process.alpha[index], alpha),
            jnp.where(raised, table[index], s),
        )
    raised = s_target > s
    t_hat = process.time_at_log_snr(-2.0 * jnp.log(s_target)).astype(t.dtype)
    a_hat, sigma_hat = process.alpha_sigma(t_hat)
    return jnp.where(raised, t_hat, t), jnp.where(raised, a_hat, alpha), jnp.where(raised, sigma_hat / a_hat, s)


def edm_sample(
    model_fn: diffusion.ModelFn,
    schedule: NoiseProcess,
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
    return_info: bool = False,
    return_trajectory: bool = False,
    edit: ChainEdit | None = None,
) -> jax.Array | tuple[jax.Array, SampleInfo]:
    """Integrates EDM's probability-flow ODE dx~/ds = (x~ - D(x~; s)) / s (their Eq. 3 with
    sigma(t) = t) in the variance-exploding scale x~ = x / alpha, s = sigma / alpha.

    Each step i: churn s^ = s_i (1 + gamma), gamma = min(S_churn / N, sqrt(2) - 1) when
    S_tmin <= s_i <= S_tmax, adding fresh noise of std sqrt(s^2 - s_i^2) S_noise; then an
    Euler step to s_{i+1}, and for 'heun' the trapezoidal correction unless s_{i+1} = 0
    (Algorithm 2). On a discrete schedule every s the network sees is a training timestep
    (EDM's `round_sigma`); on a continuous process (`sde.EDM` is Karras et al.'s own) it is
    exact. NFE: N for Euler, 2N - 1 for Heun. `spacing='karras'` places the N steps with
    rho = 7 (their Eq. 5); S_churn = 0 is the deterministic sampler and `key` is then unused.
    """
    if solver not in SOLVERS:
        raise ConfigError(f"sample.solver: unknown solver {solver!r}; choose one of: {', '.join(SOLVERS)}")
    levels = noise_levels(schedule, steps, spacing, rho=rho)
    num_steps = levels.num
    t, alpha = jnp.asarray(levels.t), f32(levels.alpha)
    s_from = f32(levels.sigma / levels.alpha)
    s_to = f32(levels.sigma_to / levels.alpha_to)
    alpha_to = f32(levels.alpha_to)
    gamma = min(s_churn / num_steps, math.sqrt(2.0) - 1.0)

    def x0_at(x_ve: jax.Array, t_model: jax.Array, a: jax.Array, s: jax.Array) -> jax.Array:
        """D(x~; s): the denoiser at model time t_model (alpha = a, sigma = a s), fed x = a x~."""
        out = model_fn(a * x_ve, jnp.full((x_ve.shape[0],), t_model, t.dtype))
        return diffusion.to_x0_eps(out, a * x_ve, a, a * s, prediction, clip_x0).x0

    def step(x: jax.Array, state: None, i: jax.Array, key: jax.Array) -> tuple[jax.Array, None]:
        x_ve = x / alpha[i]
        s = s_from[i]
        churn = jnp.where((s >= s_tmin) & (s <= s_tmax), gamma, 0.0)
        t_hat, a_hat, s_hat = _raised_level(schedule, t[i], alpha[i], s, s * (1.0 + churn))
        noise = jax.random.normal(key, x.shape, x.dtype)
        # Exactly no noise without churn (s_hat^2 - s^2 would leave an FMA rounding residue).
        churn_std = jnp.where(s_hat > s, jnp.sqrt(jnp.maximum(s_hat**2 - s**2, 0.0)), 0.0)
        x_hat = x_ve + churn_std * s_noise * noise
        d = (x_hat - x0_at(x_hat, t_hat, a_hat, s_hat)) / s_hat
        x_next = x_hat + (s_to[i] - s_hat) * d
        if solver == "heun":

            def correct(x_next: jax.Array) -> jax.Array:
                d_next = (x_next - x0_at(x_next, t[i - 1], alpha[i - 1], s_to[i])) / s_to[i]
                return x_hat + (s_to[i] - s_hat) * 0.5 * (d + d_next)

            x_next = jax.lax.cond(i > 0, correct, lambda x_next: x_next, x_next)
        return alpha_to[i] * x_next, None

    nfe = 2 * num_steps - 1 if solver == "heun" else num_steps
    return run_chain(
        step, x_T, key, num_steps, nfe=nfe, return_info=return_info, return_trajectory=return_trajectory,
        levels=levels, edit=edit,
    )
