"""DDIM (Song, Meng & Ermon 2020, arXiv 2010.02502): eta-sampling on a subsequence, inversion
x_0 -> x_T, and spherical interpolation of x_T."""

import jax
import jax.numpy as jnp

from diffusion_jax import diffusion
from diffusion_jax.samplers.chain import ChainEdit, SampleInfo, result, run_chain
from diffusion_jax.samplers.levels import NoiseProcess, denoiser, f32, noise_levels, posterior_variance


def ddim_sample(
    model_fn: diffusion.ModelFn,
    schedule: NoiseProcess,
    key: jax.Array,
    x_T: jax.Array,
    steps: int = 50,
    prediction: str = "eps",
    *,
    eta: float = 0.0,
    spacing: str = "uniform",
    clip_x0: float | None = None,
    return_info: bool = False,
    return_trajectory: bool = False,
    edit: ChainEdit | None = None,
) -> jax.Array | tuple[jax.Array, SampleInfo]:
    """Generalised (eta) DDIM sampling, Song et al. Eq. 12 on the sub-sequence tau (§4.2):

        x_prev = alpha_prev x̂_0 + sqrt(sigma_prev^2 - c^2) epŝ + c z,
        c = eta sqrt((1 - a_prev)/(1 - a_t)) sqrt(1 - a_t/a_prev)      (Eq. 16, a = alpha-bar)

    eta = 0 is the deterministic DDIM; eta = 1 is ancestral DDPM on tau with
    beta-tilde variances. The last step lands on alpha = 1, sigma = 0 and returns x̂_0.
    `spacing` picks tau: 'uniform' or 'quadratic' (the paper's), or any of
    `schedules.SPACINGS`. `schedule` may also be a continuous `sde.Process` (c^2 is then the
    general posterior variance of `levels.posterior`). NFE = the number of levels.
    """
    levels = noise_levels(schedule, steps, spacing)
    denoise = denoiser(model_fn, levels, prediction, clip_x0)
    alpha_to, sigma_to = f32(levels.alpha_to), f32(levels.sigma_to)
    c = f32(eta * posterior_variance(levels) ** 0.5)  # c^2 of Eq. 16 is eta^2 times the posterior variance

    def step(x: jax.Array, state: None, i: jax.Array, key: jax.Array) -> tuple[jax.Array, None]:
        pred = denoise(x, i)
        direction = jnp.sqrt(jnp.maximum(sigma_to[i] ** 2 - c[i] ** 2, 0.0)) * pred.eps
        x_prev = alpha_to[i] * pred.x0 + direction
        if eta == 0.0:
            return x_prev, None
        return x_prev + c[i] * jax.random.normal(key, x.shape, x.dtype), None

    return run_chain(
        step, x_T, key, levels.num, nfe=levels.num, return_info=return_info, return_trajectory=return_trajectory,
        levels=levels, edit=edit,
    )


def ddim_invert(
    model_fn: diffusion.ModelFn,
    schedule: NoiseProcess,
    x0: jax.Array,
    steps: int = 50,
    prediction: str = "eps",
    *,
    spacing: str = "uniform",
    clip_x0: float | None = None,
    return_info: bool = False,
    return_trajectory: bool = False,
) -> jax.Array | tuple[jax.Array, SampleInfo]:
    """Encodes x_0 into the x_T from which deterministic DDIM regenerates it (Song et al. §4.3,
    "encoding from x_0 to x_T", the Euler steps of their ODE Eq. 14 run forwards).

    x_0 is taken as the state at the first level; each step then moves level k-1 to level k
    with the denoiser evaluated at level k-1:

        x_k = alpha_k x̂_0(x_{k-1}) + sigma_k epŝ(x_{k-1}).

    `ddim_sample(..., steps, spacing, eta=0)` from the result returns x_0 up to the
    discretisation error, which vanishes as steps grow. NFE = levels - 1. Returns x_T, or
    (x_T, SampleInfo) whose trajectory runs from x_0 to x_T.
    """
    levels = noise_levels(schedule, steps, spacing)
    denoise = denoiser(model_fn, levels, prediction, clip_x0)
    alpha, sigma = f32(levels.alpha), f32(levels.sigma)

    def body(x: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        pred = denoise(x, k - 1)
        x_next = alpha[k] * pred.x0 + sigma[k] * pred.eps
        return x_next, (x_next if return_trajectory else None)

    x_T, xs = jax.lax.scan(body, x0, jnp.arange(1, levels.num, dtype=jnp.int32))
    trajectory = jnp.concatenate([x0[None], xs], axis=0) if return_trajectory else None
    return result(x_T, levels.num - 1, trajectory, return_info, return_trajectory)


def slerp(x1: jax.Array, x2: jax.Array, weight: float | jax.Array) -> jax.Array:
    """Spherical interpolation between two noises [B, ...] (DDIM §5.3 and Appendix D.5):

        x(w) = sin((1 - w) theta) / sin(theta) x1 + sin(w theta) / sin(theta) x2,
        theta = arccos(<x1, x2> / (|x1| |x2|)), per example over all non-batch axes.

    `weight` is a scalar or [B]; w = 0 gives x1, w = 1 gives x2. Interpolated Gaussian noises
    keep the norm a Gaussian of that dimension has, which linear interpolation shrinks.
    """
    flat1, flat2 = x1.reshape(x1.shape[0], -1), x2.reshape(x2.shape[0], -1)
    cos = jnp.sum(flat1 * flat2, axis=1) / (jnp.linalg.norm(flat1, axis=1) * jnp.linalg.norm(flat2, axis=1))
    theta = jnp.arccos(jnp.clip(cos, -1.0, 1.0))  # [B]
    w = jnp.broadcast_to(jnp.asarray(weight, x1.dtype), theta.shape)
    safe_sin = jnp.where(theta > 1e-6, jnp.sin(theta), 1.0)
    c1 = jnp.where(theta > 1e-6, jnp.sin((1.0 - w) * theta) / safe_sin, 1.0 - w)  # parallel: linear
    c2 = jnp.where(theta > 1e-6, jnp.sin(w * theta) / safe_sin, w)
    return diffusion.per_example(c1, x1) * x1 + diffusion.per_example(c2, x2) * x2
