"""The noise levels a sampler visits, taken from a discrete schedule or a continuous process.

Every sampler sees only these (DESIGN §4): for levels i = 0..N-1, increasing in noise,
x = alpha_i x_0 + sigma_i eps, and the network is called at model time t_i (the training
index for a `schedules.Schedule`, the float time for a `sde.Process`). Step i of a reverse
chain goes from level i to level i - 1, and step 0 to clean data (alpha = 1, sigma = 0).
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import diffusion, schedules
from diffusion_jax.errors import ConfigError
from diffusion_jax.schedules import Schedule
from diffusion_jax.sde import Process

NoiseProcess = Schedule | Process


class NoiseLevels(NamedTuple):
    """`t` [N] (int32 or float32) and float64 `alpha`, `sigma` [N], increasing in noise."""

    t: np.ndarray
    alpha: np.ndarray
    sigma: np.ndarray

    @property
    def num(self) -> int:
        return len(self.t)

    @property
    def alpha_to(self) -> np.ndarray:
        """alpha of where step i lands: level i - 1, or clean data (1) for step 0, float64 [N]."""
        return np.concatenate([[1.0], self.alpha[:-1]])

    @property
    def sigma_to(self) -> np.ndarray:
        """sigma of where step i lands (0 for step 0), float64 [N]."""
        return np.concatenate([[0.0], self.sigma[:-1]])


def noise_levels(process: NoiseProcess, steps: int | None, spacing: str, rho: float = 7.0) -> NoiseLevels:
    """The `steps` levels of `process` placed by `spacing` (`schedules.SPACINGS`).

    A discrete schedule with `steps=None` gives all of its T levels; its spacings round to
    training timesteps (`schedules.sampling_timesteps`). A continuous process needs `steps`.
    """
    if isinstance(process, Schedule):
        index = schedules.sampling_timesteps(process, process.num_timesteps if steps is None else steps, spacing, rho)
        return NoiseLevels(
            t=np.asarray(process.timesteps)[index].astype(np.int32),
            alpha=np.asarray(process.alpha, np.float64)[index],
            sigma=np.asarray(process.sigma, np.float64)[index],
        )
    if steps is None:
        raise ConfigError("sample.steps: a continuous-time process needs a number of steps; got None")
    times = process.sampling_times(steps, spacing, rho)
    alpha, sigma = process.alpha_sigma(times)
    return NoiseLevels(t=times.astype(np.float32), alpha=np.asarray(alpha), sigma=np.asarray(sigma))


def transition(levels: NoiseLevels) -> tuple[np.ndarray, np.ndarray]:
    """The forward step x_t = alpha_{t|s} x_s + sigma_{t|s} z of each reverse step (t = level i, s =
    where step i lands): alpha_{t|s} = alpha_t / alpha_s, sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2
    (Kingma et al. 2021, arXiv 2107.00630, Eq. 2-3). Returns float64 (alpha_{t|s}, sigma_{t|s}^2), each [N]."""
    alpha_ts = levels.alpha / levels.alpha_to
    return alpha_ts, levels.sigma**2 - alpha_ts**2 * levels.sigma_to**2


def posterior(levels: NoiseLevels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """q(x_s | x_t, x_0) between consecutive levels t = level i and s = where step i lands.

    With alpha_{t|s} and sigma_{t|s}^2 of `transition`, the posterior is
    N(c_x0 x_0 + c_xt x_t, sigma_{t|s}^2 sigma_s^2 / sigma_t^2), where
    c_x0 = alpha_s sigma_{t|s}^2 / sigma_t^2 and c_xt = alpha_{t|s} sigma_s^2 / sigma_t^2
    (Kingma et al. 2021, arXiv 2107.00630, Eqs. 9-11; Ho et al. Eq. 7 when variance-preserving,
    where sigma_{t|s}^2 is the respaced beta_t). Returns float64 (c_x0, c_xt, sigma_{t|s}^2), each [N].
    """
    alpha_ts, var_ts = transition(levels)
    c_x0 = levels.alpha_to * var_ts / levels.sigma**2
    c_xt = alpha_ts * levels.sigma_to**2 / levels.sigma**2
    return c_x0, c_xt, var_ts


def posterior_variance(levels: NoiseLevels) -> np.ndarray:
    """sigma_{t|s}^2 sigma_s^2 / sigma_t^2 for each step (beta-tilde when variance-preserving), float64 [N]."""
    _, _, var_ts = posterior(levels)
    return var_ts * levels.sigma_to**2 / levels.sigma**2


def denoiser(
    model_fn: diffusion.ModelFn, levels: NoiseLevels, prediction: str, clip_x0: float | None = None
) -> Callable[[jax.Array, jax.Array], diffusion.Prediction]:
    """`denoise(x [B, ...], i) -> Prediction(x0, eps)`: the network at level i (a traced int)."""
    diffusion.check_prediction(prediction, diffusion.MODEL_OUTPUTS)
    t, alpha, sigma = jnp.asarray(levels.t), f32(levels.alpha), f32(levels.sigma)

    def denoise(x: jax.Array, i: jax.Array) -> diffusion.Prediction:
        out = model_fn(x, jnp.full((x.shape[0],), t[i], t.dtype))
        return diffusion.to_x0_eps(out, x, alpha[i], sigma[i], prediction, clip_x0)

    return denoise


def f32(values: np.ndarray) -> jax.Array:
    """Host float64 coefficients as a float32 device array."""
    return jnp.asarray(values, jnp.float32)
