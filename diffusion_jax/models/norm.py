"""GroupNorm with ADM's scale-shift and SiLU in one call, NHWC.

GroupNorm (Wu & He 2018, arXiv 1803.08494, eq. (1)-(2)) over x [B, H, W, C] with G groups:

    x̂ = (x - μ_bg) / sqrt(σ²_bg + eps),   μ, σ² over the H*W*C/G entries of group g of example b,
    a = γ_c x̂ + β_c,
    a' = a (1 + s_bc) + t_bc               (ADM's AdaGN, Dhariwal & Nichol 2021, §3; s = t = 0 without),
    y = SiLU(a') = a' σ(a')                (or y = a' without the activation).

The statistic is single-pass, σ² = max(E[x²] - μ², 0), in float32, exactly as flax's `nnx.GroupNorm`
(its default `use_fast_variance=True`), whose parameter names (`scale`, `bias`) the module keeps, so
checkpoints and the weight-conversion tables see the same paths. JAX differentiates it, in both
modes. Two fused forms with a hand-written derivative (a custom JVP whose transpose reduces the
full-size arrays twice; a custom VJP that recomputes x̂ from x) were measured against this plain
form and did not make the train step faster on the CPU (`benchmarks/ab_train_step.py`,
benchmarks/README.md "GroupNorm and SiLU"), so the plain form stays. γ and β are broadcast by
`bias.broadcast_channels`, so that their gradients are matrix-vector products on the CPU.
"""

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import DTypeLike

from diffusion_jax.models import bias as per_channel


class GroupNorm(nnx.Module):
    """GroupNorm with parameters `scale` [C] (ones) and `bias` [C] (zeros), named as `nnx.GroupNorm`'s
    so checkpoints and weight-conversion tables see the same paths; `__call__` optionally applies
    ADM's scale-shift and SiLU (module docstring). NHWC inputs."""

    def __init__(
        self,
        num_features: int,
        *,
        num_groups: int,
        epsilon: float = 1e-6,
        dtype: DTypeLike | None = None,
        rngs: nnx.Rngs,
    ):
        del rngs  # deterministic initialisation; the argument keeps nnx.GroupNorm's signature
        if num_features % num_groups:
            raise ValueError(f"num_groups: {num_groups} does not divide the {num_features} channels")
        self.num_groups = num_groups
        self.epsilon = epsilon
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))

    def __call__(
        self,
        x: jax.Array,
        *,
        scale: jax.Array | None = None,
        shift: jax.Array | None = None,
        silu: bool = False,
    ) -> jax.Array:
        """x [B, H, W, C] (or [B, T, C], treated as H*W = T) -> the same shape; scale, shift [B, C]."""
        shape = x.shape
        b, *_, c = shape
        xg = x.astype(jnp.float32).reshape(b, -1, self.num_groups, c // self.num_groups)  # [B, HW, G, C/G]
        mean = xg.mean(axis=(1, 3), keepdims=True)
        var = jnp.maximum(jnp.square(xg).mean(axis=(1, 3), keepdims=True) - jnp.square(mean), 0.0)
        x_hat = ((xg - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(shape)
        y = x_hat * per_channel.broadcast_channels(self.scale[...], shape) + per_channel.broadcast_channels(
            self.bias[...], shape)
        if scale is not None or shift is not None:
            expand = (slice(None),) + (None,) * (len(shape) - 2)  # [B, C] -> [B, 1, (1,) C]
            y = y * (1.0 + (0.0 if scale is None else scale[expand])) + (0.0 if shift is None else shift[expand])
        if silu:
            y = jax.nn.silu(y)
        return y.astype(self.dtype if self.dtype is not None else x.dtype)
