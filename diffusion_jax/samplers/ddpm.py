"""Ancestral DDPM sampling (Ho et al. 2020, Algorithm 2), optionally respaced, with improved DDPM's
learned variance and the classifier-guidance mean shift."""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import diffusion
from diffusion_jax.samplers.chain import ChainEdit, SampleInfo, run_chain
from diffusion_jax.samplers.levels import NoiseProcess, f32, noise_levels, posterior, posterior_variance
from diffusion_jax.vlb import check_variance, learned_log_variance

# (x_t [B, ...], t [B] model time) -> s * grad_x log p(y | x_t) [B, ...]  (guidance.classifier_grad)
CondFn = Callable[[jax.Array, jax.Array], jax.Array]


def ddpm_sample(
    model_fn: diffusion.ModelFn,
    schedule: NoiseProcess,
    key: jax.Array,
    x_T: jax.Array,
    steps: int | None = None,
    prediction: str = "eps",
    *,
    variance: str = "fixed_small",
    clip_x0: float | None = None,
    spacing: str = "linspace",
    cond_fn: CondFn | None = None,
    return_info: bool = False,
    return_trajectory: bool = False,
    edit: ChainEdit | None = None,
) -> jax.Array | tuple[jax.Array, SampleInfo]:
    """Samples x_0 ~ p_theta by ancestral sampling, x_{t-1} ~ N(mu_theta(x_t, t), s_t^2 I).

    mu_theta is the posterior mean of q(x_{t-1} | x_t, x̂_0) (Ho et al. Eq. 7 with x̂_0
    from the network; equal to their Eq. 11 for eps-prediction). `variance` picks s_t^2:
    - 'fixed_small': beta-tilde_t; 'fixed_large': beta_t (Ho et al. §3.2);
    - 'learned_range': improved DDPM's learned interpolation (Nichol & Dhariwal 2021, Eq. 15),
      s_t^2 = exp(u log beta_t + (1 - u) log beta-tilde_t), u = (v + 1) / 2, where the network
      returns twice the channels, [prediction, v] concatenated on the last axis.
    `steps` < T respaces the chain onto `spacing`'d timesteps, with beta and beta-tilde
    recomputed for the kept steps (improved DDPM §4; DiT samples with 250). `clip_x0` clips
    x̂_0 to [-c, c] each step (Ho et al.'s code clips to [-1, 1]). No noise is added at the
    last step. `cond_fn` adds classifier guidance as Dhariwal & Nichol's Algorithm 1 mean
    shift, mu + s_t^2 cond_fn(x_t, t). `schedule` may be a continuous `sde.Process` (with
    `steps`), which makes this the ancestral sampler of Song et al. 2021 (their Eq. 47 for VE).
    NFE = the number of levels.
    """
    check_variance(variance)
    levels = noise_levels(schedule, steps, spacing)
    c_x0, c_xt, var_ts = posterior(levels)
    small = posterior_variance(levels)
    # beta-tilde is 0 at the first level; its log is clipped to the next level's (Ho et al.'s code).
    log_small = np.log(np.concatenate([small[1:2], small[1:]]) if levels.num > 1 else var_ts)
    log_large = np.log(var_ts)
    c_x0, c_xt, log_small, log_large = map(f32, (c_x0, c_xt, log_small, log_large))
    t, alpha, sigma = jnp.asarray(levels.t), f32(levels.alpha), f32(levels.sigma)

    def step(x: jax.Array, state: None, i: jax.Array, key: jax.Array) -> tuple[jax.Array, None]:
        t_i = jnp.full((x.shape[0],), t[i], t.dtype)
        out = model_fn(x, t_i)
        if variance == "learned_range":
            out, v = jnp.split(out, 2, axis=-1)
            log_var = learned_log_variance(v, log_small[i], log_large[i])
        else:
            log_var = log_small[i] if variance == "fixed_small" else log_large[i]
        pred = diffusion.to_x0_eps(out, x, alpha[i], sigma[i], prediction, clip_x0)
        mean = c_x0[i] * pred.x0 + c_xt[i] * x
        var = jnp.where(i > 0, jnp.exp(log_var), 0.0)  # no noise at the last step
        if cond_fn is not None:
            mean = mean + var * cond_fn(x, t_i)
        return mean + jnp.sqrt(var) * jax.random.normal(key, x.shape, x.dtype), None

    return run_chain(
        step, x_T, key, levels.num, nfe=levels.num, return_info=return_info, return_trajectory=return_trajectory,
        levels=levels, edit=edit,
    )
