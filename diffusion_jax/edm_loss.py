"""EDM's training objective (Karras et al. 2022, arXiv 2206.00364, §5, Eq. 8 and Table 1):

    E_{σ, y, n} [ λ(σ) ||D(y + n; σ) - y||² ],   ln σ ~ N(P_mean, P_std²),   n ~ N(0, σ² I),
    λ(σ) = (σ² + σ_data²) / (σ σ_data)²,

where D is the preconditioned denoiser (`models.Preconditioned`, process `sde.EDM`). λ makes the
effective target of the raw network F, (y - c_skip (y + n)) / c_out, of unit weight at every σ
(§5: λ(σ) = 1 / c_out(σ)²). The norm is the mean over dimensions (EDM's code sums; the factor is
one constant, which Adam's update does not see).
"""

import jax
import jax.numpy as jnp

from diffusion_jax import diffusion
from diffusion_jax.diffusion import per_example


def lognormal_sigmas(key: jax.Array, batch_size: int, p_mean: float = -1.2, p_std: float = 1.2) -> jax.Array:
    """σ = exp(P_mean + P_std ξ), ξ ~ N(0, 1): float32 [B] (EDM Table 1, 'Noise distribution')."""
    return jnp.exp(p_mean + p_std * jax.random.normal(key, (batch_size,), jnp.float32))


def loss_weight(sigma: jax.Array, sigma_data: float = 0.5) -> jax.Array:
    """λ(σ) = (σ² + σ_data²) / (σ σ_data)² (EDM Table 1, 'Loss weighting'), shape of σ."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def edm_loss(
    denoise: diffusion.ModelFn,
    x0: jax.Array,
    key: jax.Array,
    *,
    p_mean: float = -1.2,
    p_std: float = 1.2,
    sigma_data: float = 0.5,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """One minibatch of Eq. 8 for `denoise(x [B, ...], σ [B]) -> x̂_0`: the batch mean of
    λ(σ) mean_dims (D(x0 + σ n; σ) - x0)², with {'sigma': σ [B], 'mse': [B]} for logging."""
    sigma_key, noise_key = jax.random.split(key)
    sigma = lognormal_sigmas(sigma_key, x0.shape[0], p_mean, p_std)
    noisy = x0 + per_example(sigma, x0) * jax.random.normal(noise_key, x0.shape, jnp.float32)
    mse = jnp.mean(jnp.square(denoise(noisy, sigma).astype(jnp.float32) - x0), axis=tuple(range(1, x0.ndim)))
    return jnp.mean(loss_weight(sigma, sigma_data) * mse), {"sigma": sigma, "mse": mse}
