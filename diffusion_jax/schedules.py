"""Discrete noise schedules: betas and every quantity derived from them.

A schedule is the forward process of Ho et al. 2020 (arXiv 2006.11239, Eq. 2),
q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I), for t = 1..T. Arrays are
indexed 0-based: index i holds beta_{i+1}, so `alphas_cumprod[i]` is
alpha-bar_{i+1} = prod_{s<=i+1} (1 - beta_s) and x_t = alpha_t x_0 + sigma_t eps
with alpha_t = sqrt(alpha-bar), sigma_t = sqrt(1 - alpha-bar) (DESIGN §4).

Betas are built in float64 NumPy; every derived array is computed in float64 and
cast to float32 once, so T = 1000 products do not accumulate float32 error.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from diffusion_jax.errors import ConfigError
from diffusion_jax.registry import Registry

SCHEDULES: Registry[Callable[..., np.ndarray]] = Registry("schedule", "diffusion.schedule")


@struct.dataclass
class Schedule:
    """All per-timestep arrays of a discrete diffusion, each float32 of shape [T].

    A pytree: it can be closed over or passed through `jax.jit`. `timesteps[i]`
    is the index of the *original* training schedule that step i corresponds to;
    it is `arange(T)` for a training schedule and a subsequence after `respace`,
    and it is what a model trained on the original schedule must be given.
    """

    betas: jax.Array
    alphas: jax.Array  # 1 - beta_t
    alphas_cumprod: jax.Array  # alpha-bar_t (Ho et al. Eq. 4)
    alphas_cumprod_prev: jax.Array  # alpha-bar_{t-1}, with alpha-bar_0 = 1
    sqrt_alphas_cumprod: jax.Array  # alpha_t in the (alpha, sigma) view
    sqrt_one_minus_alphas_cumprod: jax.Array  # sigma_t
    sqrt_recip_alphas_cumprod: jax.Array  # 1 / alpha_t
    sqrt_recipm1_alphas_cumprod: jax.Array  # sigma_t / alpha_t
    posterior_variance: jax.Array  # beta-tilde_t (Ho et al. Eq. 7)
    posterior_log_variance_clipped: jax.Array  # log beta-tilde, with beta-tilde_1 := beta-tilde_2
    posterior_mean_coef1: jax.Array  # coefficient of x_0 in mu-tilde_t (Eq. 7)
    posterior_mean_coef2: jax.Array  # coefficient of x_t in mu-tilde_t (Eq. 7)
    log_snr: jax.Array  # lambda_t = log(alpha_t^2 / sigma_t^2)
    timesteps: jax.Array  # int32 [T]: original-schedule index of each step

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    @property
    def alpha(self) -> jax.Array:
        """alpha_t of x_t = alpha_t x_0 + sigma_t eps, shape [T]."""
        return self.sqrt_alphas_cumprod

    @property
    def sigma(self) -> jax.Array:
        """sigma_t of x_t = alpha_t x_0 + sigma_t eps, shape [T]."""
        return self.sqrt_one_minus_alphas_cumprod

    def alpha_sigma(self, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(alpha_t, sigma_t) at model times `t`: int32 indices of this schedule, any shape.

        The same method exists on the continuous processes of `diffusion_jax.sde` (float t),
        so code that needs the noise level of a model time works with either.
        """
        return self.alpha[t], self.sigma[t]


def from_alphas_cumprod(alphas_cumprod: np.ndarray, timesteps: np.ndarray | None = None) -> Schedule:
    """Builds a `Schedule` from alpha-bar_1..alpha-bar_T (float64 NumPy for accuracy).

    betas follow from beta_t = 1 - alpha-bar_t / alpha-bar_{t-1}, which is also how
    improved DDPM (Nichol & Dhariwal 2021, §4) respaces a schedule onto a subsequence.
    """
    ac = np.asarray(alphas_cumprod, dtype=np.float64)
    if ac.ndim != 1 or ac.size == 0:
        raise ValueError(f"alphas_cumprod must be a non-empty vector, got shape {ac.shape}")
    if not np.all((ac > 0) & (ac <= 1)) or np.any(np.diff(ac) >= 0):
        raise ValueError("alphas_cumprod must be strictly decreasing in (0, 1]")
    ac_prev = np.concatenate([[1.0], ac[:-1]])
    betas = 1.0 - ac / ac_prev
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    # beta-tilde_1 = 0; Ho et al. (and iDDPM) clip its log by reusing beta-tilde_2.
    post_log_var = np.log(np.append(post_var[1], post_var[1:]) if ac.size > 1 else betas)
    arrays = dict(
        betas=betas,
        alphas=1.0 - betas,
        alphas_cumprod=ac,
        alphas_cumprod_prev=ac_prev,
        sqrt_alphas_cumprod=np.sqrt(ac),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - ac),
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ac),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ac - 1.0),
        posterior_variance=post_var,
        posterior_log_variance_clipped=post_log_var,
        posterior_mean_coef1=betas * np.sqrt(ac_prev) / (1.0 - ac),
        posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(1.0 - betas) / (1.0 - ac),
        log_snr=np.log(ac) - np.log1p(-ac),
    )
    if timesteps is None:
        timesteps = np.arange(ac.size)
    return Schedule(
        **{k: jnp.asarray(v, dtype=jnp.float32) for k, v in arrays.items()},
        timesteps=jnp.asarray(timesteps, dtype=jnp.int32),
    )


def from_betas(betas: np.ndarray) -> Schedule:
    """Builds a `Schedule` from beta_1..beta_T."""
    betas = np.asarray(betas, dtype=np.float64)
    if np.any(betas <= 0) or np.any(betas >= 1):
        raise ValueError("betas must lie in (0, 1)")
    return from_alphas_cumprod(np.cumprod(1.0 - betas))


@SCHEDULES.register("linear")
def linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """Ho et al. 2020 §4: betas increasing linearly from 1e-4 to 0.02 (float64 [T])."""
    return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


@SCHEDULES.register("cosine")
def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal 2021 Eq. 17: alpha-bar(t) = f(t)/f(0), f(t) = cos^2((t/T + s)/(1 + s) pi/2).

    beta_t = 1 - alpha-bar(t)/alpha-bar(t-1), clipped at `max_beta` = 0.999 to avoid the
    singularity at t = T (their §3.2).
    """
    t = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    f = np.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    return np.minimum(1.0 - f[1:] / f[:-1], max_beta)


@SCHEDULES.register("scaled_linear")
def scaled_linear_betas(
    num_timesteps: int, beta_start: float = 0.00085, beta_end: float = 0.012
) -> np.ndarray:
    """Latent diffusion (Rombach et al. 2022): sqrt(beta) linear from sqrt(0.00085) to sqrt(0.012)."""
    return np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=np.float64) ** 2


@SCHEDULES.register("sigmoid")
def sigmoid_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """GeoDiff (Xu et al. 2022, arXiv 2203.02923): beta = sigmoid(linspace(-6, 6)) rescaled to [start, end]."""
    x = np.linspace(-6.0, 6.0, num_timesteps, dtype=np.float64)
    return beta_start + (beta_end - beta_start) / (1.0 + np.exp(-x))


def get(name: str, num_timesteps: int = 1000, **kwargs: float) -> Schedule:
    """The named schedule ('linear', 'cosine', 'scaled_linear', 'sigmoid') with T steps."""
    make_betas = SCHEDULES.get(name)
    if num_timesteps < 1:
        raise ConfigError(f"diffusion.num_timesteps must be >= 1, got {num_timesteps}")
    return from_betas(make_betas(num_timesteps, **kwargs))


def linear(num_timesteps: int = 1000, **kwargs: float) -> Schedule:
    """`get('linear', ...)`: Ho et al.'s schedule."""
    return get("linear", num_timesteps, **kwargs)


def cosine(num_timesteps: int = 1000, **kwargs: float) -> Schedule:
    """`get('cosine', ...)`: improved DDPM's schedule."""
    return get("cosine", num_timesteps, **kwargs)


def scaled_linear(num_timesteps: int = 1000, **kwargs: float) -> Schedule:
    """`get('scaled_linear', ...)`: latent diffusion's schedule."""
    return get("scaled_linear", num_timesteps, **kwargs)


def sigmoid(num_timesteps: int = 1000, **kwargs: float) -> Schedule:
    """`get('sigmoid', ...)`: GeoDiff's schedule."""
    return get("sigmoid", num_timesteps, **kwargs)


SPACINGS = ("linspace", "uniform", "leading", "trailing", "quadratic", "logsnr", "karras")


def space_timesteps(num_timesteps: int, steps: int, spacing: str = "linspace") -> np.ndarray:
    """Chooses `steps` of the T training timesteps (0-based, increasing, int64).

    - 'linspace': evenly spaced with rounding, always keeping 0 and T-1
      (improved DDPM's `space_timesteps` with one section; DiT's 250-step sampling).
    - 'uniform' (also called 'leading'): tau_i = i * floor(T / S) (DDIM, Song et al. 2020,
      Appendix D.2; diffusers' 'leading' without its `steps_offset`).
    - 'trailing': round(T - i T / S) - 1, always keeping T-1 (Lin et al. 2024,
      arXiv 2305.08891, Table 2; diffusers' 'trailing').
    - 'quadratic': tau_i = floor((i * sqrt(0.8 T) / (S - 1))^2) (DDIM, Appendix D.2).
      Its first few tau repeat when S is large; a repeated step is a no-op in DDIM,
      so repeats are dropped and slightly fewer than S steps are returned.
    'logsnr' depends on the schedule: see `sampling_timesteps`.
    """
    if not 1 <= steps <= num_timesteps:
        raise ConfigError(f"sample.steps must be in [1, {num_timesteps}], got {steps}")
    if spacing == "linspace":
        ts = np.round(np.linspace(0, num_timesteps - 1, steps)).astype(np.int64)
    elif spacing in ("uniform", "leading"):
        ts = np.arange(steps, dtype=np.int64) * (num_timesteps // steps)
    elif spacing == "trailing":
        ts = np.round(np.arange(num_timesteps, 0, -num_timesteps / steps)).astype(np.int64)[::-1] - 1
    elif spacing == "quadratic":
        ts = np.unique((np.linspace(0, math.sqrt(num_timesteps * 0.8), steps) ** 2).astype(np.int64))
    else:
        raise ConfigError(
            f"sample.spacing: unknown spacing {spacing!r}; choose one of: {', '.join(SPACINGS)}"
        )
    return ts


def sampling_timesteps(schedule: Schedule, steps: int, spacing: str, rho: float = 7.0) -> np.ndarray:
    """`space_timesteps`, plus two spacings that depend on the schedule, each rounded to the
    nearest training timestep with repeats dropped:

    - 'logsnr': uniform in lambda = log(alpha^2 / sigma^2) from lambda_T to lambda_1
      (DPM-Solver, Lu et al. 2022, arXiv 2206.00927, §3.3);
    - 'karras': sigma_i = (s_max^(1/rho) + i/(S-1) (s_min^(1/rho) - s_max^(1/rho)))^rho in the
      variance-exploding scale s = sigma/alpha, rho = 7 (EDM, Karras et al. 2022, Eq. 5).
    """
    if spacing not in ("logsnr", "karras"):
        return space_timesteps(schedule.num_timesteps, steps, spacing)
    space_timesteps(schedule.num_timesteps, steps, "linspace")  # validates `steps`
    log_snr = np.asarray(schedule.log_snr, np.float64)  # decreasing in t
    if spacing == "logsnr":
        targets = np.linspace(log_snr[-1], log_snr[0], steps)
    else:
        ve_sigma = np.exp(-0.5 * log_snr)  # sigma / alpha, increasing in t
        ramp = np.linspace(0.0, 1.0, steps)
        lo, hi = ve_sigma[0] ** (1 / rho), ve_sigma[-1] ** (1 / rho)
        targets = -2.0 * np.log((hi + ramp * (lo - hi)) ** rho)
    nearest = np.abs(log_snr[None, :] - targets[:, None]).argmin(axis=1)
    return np.unique(nearest).astype(np.int64)


def respace(schedule: Schedule, timesteps: np.ndarray) -> Schedule:
    """The schedule restricted to a subsequence of its timesteps (improved DDPM §4).

    Keeps alpha-bar at the chosen steps and recomputes betas from it, so the
    marginals q(x_t | x_0) at the kept steps are unchanged. The result's
    `timesteps` maps each new step to the original index the model was trained on.
    `schedule` must be concrete (not traced): respacing is done once, in float64.
    """
    timesteps = np.asarray(timesteps)
    ac = np.asarray(schedule.alphas_cumprod, dtype=np.float64)
    original = np.asarray(schedule.timesteps)
    return from_alphas_cumprod(ac[timesteps], timesteps=original[timesteps])
