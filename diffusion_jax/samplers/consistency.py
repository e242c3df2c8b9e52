"""Consistency sampling: one step, or several with fresh noise between them (Song et al. 2023,
arXiv 2303.01469, Algorithm 1)."""

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import diffusion, sde
from diffusion_jax.errors import ConfigError
from diffusion_jax.samplers.chain import ChainEdit, Landing, SampleInfo, run_chain
from diffusion_jax.samplers.levels import NoiseLevels, NoiseProcess, denoiser, f32, noise_levels


def consistency_sample(
    model_fn: diffusion.ModelFn,
    schedule: NoiseProcess,
    key: jax.Array,
    x_T: jax.Array,
    steps: int = 1,
    prediction: str = "x0",
    *,
    spacing: str = "karras",
    sigmas: tuple[float, ...] | None = None,
    sigma_min: float | None = None,
    clip_x0: float | None = None,
    return_info: bool = False,
    return_trajectory: bool = False,
    edit: ChainEdit | None = None,
) -> jax.Array | tuple[jax.Array, SampleInfo]:
    """Algorithm 1: x ← f(x_T, T); then for each chosen level τ, from the noisiest down,
    x_τ = α_τ x + sqrt(σ_τ² - α_τ² σ_min²) z and x ← f(x_τ, τ). NFE = the number of levels.

    The levels are the `steps` noisiest of `steps` + 1 levels of `schedule` placed by `spacing`
    (EDM's 'karras' by default; the noisiest is the process's top, the dropped one its bottom,
    where f is the identity), or, with `sigmas`, chosen model times, noisiest first
    (the paper picks them by a greedy search on FID, §6; on `sde.EDM` the model time is σ).
    `sigma_min` is the noise a consistency function's output keeps (its boundary σ_min;
    default `sde.EDM`'s sigma_min, else 0). `model_fn` is the consistency function f
    (prediction 'x0'), or any denoiser: then this is the "denoise, re-noise" sampler.
    """
    levels = _levels(schedule, steps, spacing, sigmas)
    if sigma_min is None:
        sigma_min = float(schedule.sigma_min) if isinstance(schedule, sde.EDM) else 0.0
    denoise = denoiser(model_fn, levels, prediction, clip_x0)
    alpha = f32(levels.alpha)
    renoise = f32(np.sqrt(np.maximum(levels.sigma**2 - levels.alpha**2 * sigma_min**2, 0.0)))
    top = levels.num - 1

    def step(x: jax.Array, state: None, i: jax.Array, key: jax.Array) -> tuple[jax.Array, None]:
        # At the top level x is x_T itself; below it x is the previous x̂_0, noised afresh to level i.
        noised = alpha[i] * x + renoise[i] * jax.random.normal(key, x.shape, x.dtype)
        return denoise(jnp.where(i == top, x, noised), i).x0, None

    clean = Landing(np.ones(levels.num), np.zeros(levels.num))  # every step returns a clean estimate
    return run_chain(step, x_T, key, levels.num, nfe=levels.num, return_info=return_info,
                     return_trajectory=return_trajectory, levels=levels, landing=clean, edit=edit)


def _levels(schedule: NoiseProcess, steps: int, spacing: str, sigmas: tuple[float, ...] | None) -> NoiseLevels:
    if sigmas is None:  # `steps` + 1 levels less the cleanest: f at σ_min is the identity, a wasted evaluation
        levels = noise_levels(schedule, steps + 1, spacing)
        return NoiseLevels(*(a[1:] for a in levels))
    times = np.asarray(sigmas, np.float64)
    if times.ndim != 1 or len(times) == 0 or np.any(np.diff(times) >= 0):
        raise ConfigError(f"sample.sigmas: {tuple(sigmas)}; expected model times, noisiest first and decreasing")
    if not hasattr(schedule, "alpha_sigma") or not hasattr(schedule, "t_min"):
        raise ConfigError("sample.sigmas: explicit levels need a continuous process (sde.EDM: model time = σ)")
    times = times[::-1].copy()  # increasing in noise, as NoiseLevels are
    alpha, sigma = schedule.alpha_sigma(times)
    return NoiseLevels(t=times.astype(np.float32), alpha=np.asarray(alpha, np.float64), sigma=np.asarray(sigma))
