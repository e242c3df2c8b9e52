"""EDM's preconditioned denoiser as a model wrapper (Karras et al. 2022, arXiv 2206.00364, Eq. 7):

    D(x; σ) = c_skip(σ) x + c_out(σ) F(c_in(σ) x; c_noise(σ)),

around any backbone F of this package (`model(x, t, cond, train, rngs=...)`). The wrapper *is* the run's
model under `diffusion.process='edm'`: it is called at model time σ and returns x̂_0 (prediction 'x0'),
so every sampler, guidance and the eval mode drive it as any other model, and a checkpoint holds the
backbone's parameters under `backbone/`.

- 'edm': Table 1's coefficients (`sde.precondition`);
- 'consistency': the consistency models' σ_min-shifted form (Song et al. 2023, App. C;
  `distill.consistency.consistency_function`), under which D(x; σ_min) = x exactly, the boundary condition;
- 'flow': no scaling of x or of the output, which is the velocity ε - x_0 of `sde.Flow` (prediction
  'velocity'), and c_noise = 1000 t, the timestep scale SD3 feeds its transformer (Esser et al. 2024);
- 'meanflow': as 'flow', for MeanFlow's average velocity u(z, r, t) (Geng et al. 2025, arXiv 2505.13447): the
  model time is the pair (t, r) [B, 2], whose interval h = t - r reaches the backbone as `cond['interval']`
  (the backbone built with `interval_embedding`). A model time [B] is r = t, where u is the instantaneous
  velocity v(z, t): every flow sampler drives the network as a flow, and the `meanflow` sampler jumps.
  The backbone sees `time_scale` × (t, t - r), 10 by default, not flow matching's 1000: the MeanFlow target
  differentiates u in t, and at 1000 t the sinusoidal embedding's fastest features (sin(1000 t)) make ∂_t u
  O(1000) at initialisation; training then diverged (measured: the unweighted error rose from 1.2 to 40-290 in
  200 steps on digits, and on a 2-D Gaussian), while 10 and 1 trained (`meanflow.time_scale`).

c_noise is 1000 × EDM's ¼ ln σ, i.e. 250 ln σ, for both: our backbones embed the time as DDPM's
timesteps in [0, 1000), and the official consistency-models code feeds its ADM U-Net the same
1000 · ¼ ln σ (openai/consistency_models, cm/karras_diffusion.py, `denoise`).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_jax import conditioning, sde
from diffusion_jax.distill import consistency
from diffusion_jax.errors import ConfigError

KINDS = ("edm", "consistency", "flow", "meanflow")
C_NOISE_SCALE = 1000.0  # EDM's c_noise = ¼ ln σ, in the units of DDPM timesteps
MEANFLOW_TIME_SCALE = 10.0  # a MeanFlow backbone sees (10 t, 10 (t - r)): see `time_scale` above


class Preconditioned(nnx.Module):
    """D(x; σ) around `backbone`: called as `model(x [B, ...], sigma [B], cond, train, rngs=...)` -> x̂_0 [B, ...]
    (for 'flow': `model(x, t, ...)` -> the velocity; for 'meanflow', `model(x, t [B] or (t, r) [B, 2], ...)` -> the
    average velocity over [r, t])."""

    def __init__(
        self, backbone: nnx.Module, kind: str = "edm", sigma_data: float = 0.5, sigma_min: float = 0.002,
        time_scale: float = MEANFLOW_TIME_SCALE,
    ):
        if kind not in KINDS:
            raise ConfigError(f"diffusion.preconditioning: unknown {kind!r}; choose one of: {', '.join(KINDS)}")
        self.backbone = backbone
        self.kind, self.sigma_data, self.sigma_min, self.time_scale = kind, sigma_data, sigma_min, time_scale

    def __call__(
        self, x: jax.Array, sigma: jax.Array, cond=None, train: bool = False, *, rngs: nnx.Rngs | None = None
    ) -> jax.Array:
        sigma = jnp.asarray(sigma, jnp.float32)
        if self.kind == "meanflow":
            t, r = (sigma[:, 0], sigma[:, 1]) if sigma.ndim == 2 else (sigma, sigma)
            t, r = jnp.broadcast_to(t, x.shape[:1]), jnp.broadcast_to(r, x.shape[:1])
            with_interval = conditioning.as_dict(cond) | {"interval": self.time_scale * (t - r)}
            return self.backbone(x, self.time_scale * t, with_interval, train, rngs=rngs).astype(jnp.float32)
        sigma = jnp.broadcast_to(sigma, x.shape[:1])
        network = lambda x_in, c_noise: self.backbone(x_in.astype(x.dtype), c_noise, cond, train, rngs=rngs)  # noqa: E731
        if self.kind == "flow":
            return network(x, C_NOISE_SCALE * sigma).astype(jnp.float32)
        if self.kind == "edm":
            denoiser = sde.precondition(network, "edm", self.sigma_data, c_noise_scale=C_NOISE_SCALE)
        else:
            denoiser = consistency.consistency_function(
                network, consistency.Grid(sigma_min=self.sigma_min, sigma_data=self.sigma_data))
        return denoiser(x.astype(jnp.float32), sigma).astype(jnp.float32)
