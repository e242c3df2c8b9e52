"""Ancestral DDPM sampling (Ho et al. 2020, Algorithm 2), optionally respaced."""

import jax
import jax.numpy as jnp

from diffusion_jax import diffusion, schedules
from diffusion_jax.errors import ConfigError
from diffusion_jax.samplers.chain import run_chain
from diffusion_jax.schedules import Schedule

VARIANCES = ("fixed_small", "fixed_large")


def ddpm_sample(
    model_fn: diffusion.ModelFn,
    schedule: Schedule,
    key: jax.Array,
    x_T: jax.Array,
    steps: int | None = None,
    prediction: str = "eps",
    *,
    variance: str = "fixed_small",
    clip_x0: float | None = None,
    spacing: str = "linspace",
    return_trajectory: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Samples x_0 ~ p_theta by ancestral sampling, x_{t-1} ~ N(mu_theta(x_t, t), s_t^2 I).

    mu_theta is the posterior mean of q(x_{t-1} | x_t, x̂_0) (Ho et al. Eq. 7 with x̂_0
    from the network; equal to their Eq. 11 for eps-prediction). `variance` picks
    s_t^2: 'fixed_small' = beta-tilde_t, 'fixed_large' = beta_t (Ho et al. §3.2; the
    first step uses beta-tilde_2 as in improved DDPM). `steps` < T respaces the
    chain onto `spacing`'d timesteps (improved DDPM §4; DiT samples with 250).
    `clip_x0` clips x̂_0 to [-c, c] each step (Ho et al.'s code clips to [-1, 1]).
    No noise is added at the last step.
    """
    if variance not in VARIANCES:
        raise ConfigError(f"sample.variance: unknown variance {variance!r}; choose one of: {', '.join(VARIANCES)}")
    T = schedule.num_timesteps
    steps = T if steps is None else steps
    if steps != T:
        schedule = schedules.respace(schedule, schedules.sampling_timesteps(schedule, steps, spacing))
    denoise = diffusion.make_denoiser(model_fn, schedule, prediction, clip_x0)
    if variance == "fixed_small":
        log_var = schedule.posterior_log_variance_clipped
    else:
        log_var = jnp.log(jnp.concatenate([schedule.posterior_variance[1:2], schedule.betas[1:]]))

    def step(x: jax.Array, state: None, i: jax.Array, key: jax.Array) -> tuple[jax.Array, None]:
        t = jnp.full((x.shape[0],), i, jnp.int32)
        pred = denoise(x, t)
        mean, _, _ = diffusion.q_posterior(schedule, pred.x0, x, t)
        noise = jax.random.normal(key, x.shape, x.dtype)
        return mean + jnp.where(i > 0, jnp.exp(0.5 * log_var[i]), 0.0) * noise, None

    return run_chain(step, x_T, key, schedule.num_timesteps, return_trajectory)
