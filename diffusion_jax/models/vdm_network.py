"""A variational diffusion model's network and its learned schedule as one module (Kingma et al. 2021,
arXiv 2107.00630): the run's model under `diffusion.process='vdm'`.

    ε̂(z_t; t) = F([z_t, sin/cos(2^n π z_t)], 1000 (γ(t) - γ_min) / (γ_max - γ_min))

around any backbone F of this package (`model(x, t, cond, train, rngs=...)`) built with the Fourier
features' channels in and the data's channels out. The network is conditioned on γ_t, as VDM's is, scaled
to DDPM's timestep range by the initial endpoints (γ_min, γ_max); `gamma` is the learned monotonic schedule
(`vdm.MonotonicGamma`), so a checkpoint holds both, under `backbone/` and `gamma/`, and the EMA averages both.
Samplers call the module at model time t ∈ [0, 1] and get ε̂ (prediction 'eps') on the process of the same
parameters' γ (`vdm.LearnedVP`, bound by `training.setup.bind_process`).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_jax import vdm

C_NOISE_SCALE = 1000.0  # γ's initial range mapped onto DDPM's timestep scale


class VDMNetwork(nnx.Module):
    """ε̂ of `backbone` on Fourier features, conditioned on γ(t) of `gamma`."""

    def __init__(self, backbone: nnx.Module, gamma: vdm.MonotonicGamma, gamma_min: float, gamma_max: float,
                 fourier: tuple[int, int] | None = (6, 7)):
        self.backbone, self.gamma = backbone, gamma
        self.gamma_min, self.gamma_max = gamma_min, gamma_max
        self.fourier = None if fourier is None else tuple(fourier)

    def __call__(
        self, z: jax.Array, t: jax.Array, cond=None, train: bool = False, *, rngs: nnx.Rngs | None = None
    ) -> jax.Array:
        """ε̂ [B, ...] at model time t [B] (or a scalar) in [0, 1]."""
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), z.shape[:1])
        return self.eps(z, self.gamma(t), cond, train, rngs=rngs)

    def eps(
        self, z: jax.Array, gamma: jax.Array, cond=None, train: bool = False, *, rngs: nnx.Rngs | None = None
    ) -> jax.Array:
        """ε̂ [B, ...] at noise level γ_t [B] (the objective's call: γ_t comes from the γ it differentiates)."""
        features = z if self.fourier is None else vdm.fourier_features(z.astype(jnp.float32), *self.fourier)
        c_noise = C_NOISE_SCALE * (gamma - self.gamma_min) / (self.gamma_max - self.gamma_min)
        return self.backbone(features.astype(z.dtype), c_noise, cond, train, rngs=rngs).astype(jnp.float32)


def feature_channels(channels: int, fourier: tuple[int, int] | None) -> int:
    """The channels of `vdm.fourier_features` of `channels`-channel data, n = fourier[0]..fourier[1]."""
    return channels if fourier is None else channels * (1 + 2 * (fourier[1] - fourier[0] + 1))
