"""DDIM sampling (Song, Meng & Ermon 2020, arXiv 2010.02502) on a strided subsequence."""

import jax
import jax.numpy as jnp

from diffusion_jax import diffusion, schedules
from diffusion_jax.samplers.chain import run_chain
from diffusion_jax.schedules import Schedule


def ddim_sample(
    model_fn: diffusion.ModelFn,
    schedule: Schedule,
    key: jax.Array,
    x_T: jax.Array,
    steps: int = 50,
    prediction: str = "eps",
    *,
    eta: float = 0.0,
    spacing: str = "uniform",
    clip_x0: float | None = None,
    return_trajectory: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Generalised (eta) DDIM sampling, Song et al. Eq. 12 on the sub-sequence tau (§4.2):

        x_prev = alpha_prev x̂_0 + sqrt(sigma_prev^2 - c^2) epŝ + c z,
        c = eta sqrt((1 - a_prev)/(1 - a_t)) sqrt(1 - a_t/a_prev)      (Eq. 16, a = alpha-bar)

    eta = 0 is the deterministic DDIM; eta = 1 is ancestral DDPM on tau with
    beta-tilde variances. The last step uses alpha-bar_prev = 1 and returns x̂_0.
    `spacing` picks tau: 'uniform' or 'quadratic' (the paper's), or 'linspace'.
    """
    schedule = schedules.respace(schedule, schedules.sampling_timesteps(schedule, steps, spacing))
    denoise = diffusion.make_denoiser(model_fn, schedule, prediction, clip_x0)
    alpha_prev = jnp.sqrt(schedule.alphas_cumprod_prev)
    sigma_prev = jnp.sqrt(1.0 - schedule.alphas_cumprod_prev)
    # c^2 of Eq. 16 equals eta^2 times the respaced posterior variance beta-tilde.
    c = eta * jnp.sqrt(schedule.posterior_variance)

    def step(x: jax.Array, state: None, i: jax.Array, key: jax.Array) -> tuple[jax.Array, None]:
        pred = denoise(x, jnp.full((x.shape[0],), i, jnp.int32))
        direction = jnp.sqrt(jnp.maximum(sigma_prev[i] ** 2 - c[i] ** 2, 0.0)) * pred.eps
        x_prev = alpha_prev[i] * pred.x0 + direction
        if eta == 0.0:
            return x_prev, None
        return x_prev + c[i] * jax.random.normal(key, x.shape, x.dtype), None

    return run_chain(step, x_T, key, schedule.num_timesteps, return_trajectory)
