"""Score-based samplers: predictor-corrector (Song et al. 2021, arXiv 2011.13456, Algorithms 2-5)
and NCSN's annealed Langevin dynamics (Song & Ermon 2019, arXiv 1907.05600, Algorithm 1).

Both need only the score s(x, t) = -eps^(x, t) / sigma_t, which any network kind gives through
`levels.denoiser` (prediction 'eps' | 'x0' | 'v' | 'score').
"""

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import diffusion, sde
from diffusion_jax.errors import ConfigError
from diffusion_jax.samplers.chain import ChainEdit, SampleInfo, run_chain
from diffusion_jax.samplers.levels import NoiseProcess, denoiser, f32, noise_levels, transition

PREDICTORS = ("reverse_diffusion", "euler_maruyama", "none")
CORRECTORS = ("langevin", "none")


def _mean_norm(x: jax.Array) -> jax.Array:
    """||x|| over all but the batch axis, averaged over the batch (a scalar)."""
    return jnp.mean(jnp.sqrt(jnp.sum(jnp.square(x.reshape(x.shape[0], -1)), axis=1)))


def pc_sample(
    model_fn: diffusion.ModelFn,
    schedule: NoiseProcess,
    key: jax.Array,
    x_T: jax.Array,
    steps: int = 1000,
    prediction: str = "eps",
    *,
    predictor: str = "reverse_diffusion",
    corrector: str = "langevin",
    snr: float = 0.16,
    n_corrector: int = 1,
    spacing: str = "linspace",
    clip_x0: float | None = None,
    return_info: bool = False,
    return_trajectory: bool = False,
    edit: ChainEdit | None = None,
) -> jax.Array | tuple[jax.Array, SampleInfo]:
    """Predictor-corrector sampling (Song et al. 2021, Algorithm 1; Algorithms 4 and 5 for VE and VP).

    At each level t_i, from the noisiest: `n_corrector` Langevin corrector steps
        x <- x + e s(x, t_i) + sqrt(2 e) z,   e = 2 a_i (snr ||z|| / ||s(x, t_i)||)^2,
    with a_i = alpha_{t|s}^2 (1 - beta_i for VP, 1 for VE), then one predictor step to t_{i-1}:
    - 'reverse_diffusion': the reverse of the forward step x_t = alpha_{t|s} x_s + sigma_{t|s} z
      (their Eq. 45-47): x_s = (2 - alpha_{t|s}) x_t + sigma_{t|s}^2 s(x_t, t) + sigma_{t|s} z;
    - 'euler_maruyama': x_s = x_t - [f - g^2 s] dt + g sqrt(dt) z, dt = t_i - t_{i-1};
    - 'none': corrector only (Langevin at each level).
    The last predictor step returns the denoiser's x̂_0 at t_0 (Tweedie's E[x_0 | x], the noise
    removal of their App. G), as every sampler here lands on clean data. ||z|| and ||s|| are
    averaged over the batch, as in score_sde's code: per-example norms (the algorithm as printed)
    blow the step up wherever ||s|| nears 0, which low-dimensional data hits. snr = 0.16 is the paper's
    choice for VE on CIFAR-10 (Table 4 uses 0.16 for PC1000); NFE = steps (1 + n_corrector),
    or steps n_corrector with predictor 'none'.
    """
    if predictor not in PREDICTORS:
        raise ConfigError(f"sample.predictor: unknown predictor {predictor!r}; choose one of: {', '.join(PREDICTORS)}")
    if corrector not in CORRECTORS:
        raise ConfigError(f"sample.corrector: unknown corrector {corrector!r}; choose one of: {', '.join(CORRECTORS)}")
    if not isinstance(n_corrector, int) or n_corrector < 0:
        raise ConfigError(f"sample.n_corrector: got {n_corrector!r}; expected an int >= 0")
    if corrector == "none":
        n_corrector = 0
    levels = noise_levels(schedule, steps, spacing)
    denoise = denoiser(model_fn, levels, prediction, clip_x0)
    alpha_ts, var_ts = map(f32, transition(levels))
    sigma = f32(levels.sigma)
    process = sde.as_process(schedule)
    t = jnp.asarray(levels.t)
    dt = f32(np.diff(np.concatenate([[0.0], levels.t.astype(np.float64)])))  # t_i - t_{i-1}; t_{-1} = 0

    def step(x: jax.Array, state: None, i: jax.Array, key: jax.Array) -> tuple[jax.Array, None]:
        keys = jax.random.split(key, n_corrector + 1)
        for j in range(n_corrector):
            grad = diffusion.score_from_eps(denoise(x, i).eps, sigma[i])
            z = jax.random.normal(keys[j], x.shape, x.dtype)
            e = 2.0 * alpha_ts[i] ** 2 * jnp.square(snr * _mean_norm(z) / _mean_norm(grad))
            x = x + e * grad + jnp.sqrt(2.0 * e) * z
        if predictor == "none":
            return x, None
        z = jax.random.normal(keys[-1], x.shape, x.dtype)
        pred = denoise(x, i)
        grad = diffusion.score_from_eps(pred.eps, sigma[i])
        if predictor == "reverse_diffusion":
            x_prev = (2.0 - alpha_ts[i]) * x + var_ts[i] * grad + jnp.sqrt(var_ts[i]) * z
        else:
            drift, g = process.sde(x, jnp.full((x.shape[0],), t[i], jnp.float32))
            g = diffusion.per_example(g, x)
            x_prev = x - (drift - g**2 * grad) * dt[i] + g * jnp.sqrt(dt[i]) * z
        return jnp.where(i > 0, x_prev, pred.x0), None

    nfe = levels.num * (n_corrector + (predictor != "none"))
    return run_chain(
        step, x_T, key, levels.num, nfe=nfe, return_info=return_info, return_trajectory=return_trajectory,
        levels=levels, edit=edit,
    )


def annealed_langevin_sample(
    model_fn: diffusion.ModelFn,
    schedule: NoiseProcess,
    key: jax.Array,
    x_T: jax.Array,
    steps: int = 10,
    prediction: str = "score",
    *,
    n_steps_each: int = 100,
    step_lr: float = 2e-5,
    spacing: str = "logsnr",
    denoise_final: bool = True,
    return_info: bool = False,
    return_trajectory: bool = False,
    edit: ChainEdit | None = None,
) -> jax.Array | tuple[jax.Array, SampleInfo]:
    """NCSN's annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1).

    For the `steps` noise levels sigma_1 > ... > sigma_L (in the scale sigma / alpha; geometric
    for a VE process with the default 'logsnr' spacing, as NCSN's), step size
    a_i = step_lr sigma_i^2 / sigma_L^2, and n_steps_each times at each level:

        x <- x + (a_i / 2) s(x, sigma_i) + sqrt(a_i) z.

    NCSN's CIFAR-10 settings are 10 levels from 1 to 0.01, 100 steps each, step_lr = 2e-5.
    `denoise_final` ends with Tweedie's denoising step x + sigma_L^2 s(x, sigma_L), one more
    network evaluation (NCSNv2, Song & Ermon 2020, arXiv 2006.09011, §4 / Jolicoeur-Martineau
    et al. 2020): the plain algorithm leaves noise of std sigma_L in the samples.
    NFE = steps n_steps_each (+ 1). For a VP process the steps act on x directly, with
    sigma_i / alpha_i setting the step size.
    """
    if not isinstance(n_steps_each, int) or n_steps_each < 1:
        raise ConfigError(f"sample.n_steps_each: got {n_steps_each!r}; expected an int >= 1")
    levels = noise_levels(schedule, steps, spacing)
    denoise = denoiser(model_fn, levels, prediction)
    ve_sigma = levels.sigma / levels.alpha
    step_size = f32(step_lr * (ve_sigma / ve_sigma[0]) ** 2)  # sigma_L is the smallest, level 0
    sigma = f32(levels.sigma)

    def step(x: jax.Array, state: None, i: jax.Array, key: jax.Array) -> tuple[jax.Array, None]:
        def langevin(j: jax.Array, x: jax.Array) -> jax.Array:
            z = jax.random.normal(jax.random.fold_in(key, j), x.shape, x.dtype)
            score = diffusion.score_from_eps(denoise(x, i).eps, sigma[i])
            return x + 0.5 * step_size[i] * score + jnp.sqrt(step_size[i]) * z

        x = jax.lax.fori_loop(0, n_steps_each, langevin, x)
        if denoise_final:  # Tweedie, E[x_0 | x] = (x + sigma^2 s) / alpha, evaluated at level 0 only
            x = jax.lax.cond(i == 0, lambda x: denoise(x, i).x0, lambda x: x, x)
        return x, None

    nfe = levels.num * n_steps_each + int(denoise_final)
    return run_chain(
        step, x_T, key, levels.num, nfe=nfe, return_info=return_info, return_trajectory=return_trajectory,
        levels=levels, edit=edit,
    )
