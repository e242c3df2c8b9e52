"""A residual MLP denoiser for low-dimensional data ([B, D] points, e.g. 2-D toy sets).

Same conditioning as the U-Net (sinusoidal time embedding + MLP, optional class
embedding with a null label; Ho et al. 2020, Appendix B; Dhariwal & Nichol 2021),
added inside each residual block as in the U-Net's ResBlocks.
"""

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import DTypeLike

from diffusion_jax.models.layers import ConditionEmbedder, linear


class MLPBlock(nnx.Module):
    """x + fc2(Dropout(SiLU(fc1(SiLU(LN(x))) + Linear(SiLU(emb)))))."""

    def __init__(self, hidden: int, *, dropout: float, rngs: nnx.Rngs, dtype: DTypeLike = jnp.float32):
        self.norm = nnx.LayerNorm(hidden, dtype=dtype, rngs=rngs)
        self.fc1 = linear(hidden, hidden, rngs=rngs, dtype=dtype)
        self.emb_proj = linear(hidden, hidden, rngs=rngs, dtype=dtype)
        self.dropout = nnx.Dropout(dropout)
        self.fc2 = linear(hidden, hidden, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, emb: jax.Array, train: bool, rngs: nnx.Rngs | None) -> jax.Array:
        """x, emb: [B, hidden] -> [B, hidden]."""
        h = self.fc1(nnx.silu(self.norm(x))) + self.emb_proj(nnx.silu(emb))
        h = self.dropout(nnx.silu(h), deterministic=not train, rngs=rngs)
        return x + self.fc2(h)


class MLP(nnx.Module):
    """Residual MLP denoiser: Linear(D, hidden) -> `depth` MLPBlocks -> LN -> SiLU -> Linear.

    The output layer is zero-initialised. Time (and label) embedding has width `hidden`.

    Args:
        in_features: D, the data dimension.
        hidden: width of the hidden layers and of the conditioning vector.
        depth: number of residual blocks.
        num_classes: enables class conditioning with a null label (index num_classes).
        learn_sigma: also output improved DDPM's variance interpolation, [B, 2D].
        out_features: the prediction's dimension (None: in_features).
        dropout: dropout rate inside the blocks.
        interval_embedding: a MeanFlow network u(z, r, t): `cond['interval']` [B], h = t - r, joins the time
            embedding (`layers.ConditionEmbedder`).
        rngs: parameter initialisation keys; the model keeps no RNG state.
        dtype: computation dtype; parameters stay float32.
    """

    def __init__(
        self,
        in_features: int,
        hidden: int = 128,
        depth: int = 3,
        num_classes: int | None = None,
        learn_sigma: bool = False,
        dropout: float = 0.0,
        *,
        rngs: nnx.Rngs,
        dtype: DTypeLike = jnp.float32,
        out_features: int | None = None,
        interval_embedding: bool = False,
    ):
        self.in_features = in_features
        self.cond = ConditionEmbedder(hidden, hidden, num_classes, interval=interval_embedding, rngs=rngs, dtype=dtype)
        self.proj_in = linear(in_features, hidden, rngs=rngs, dtype=dtype)
        self.blocks = nnx.List([MLPBlock(hidden, dropout=dropout, rngs=rngs, dtype=dtype) for _ in range(depth)])
        self.norm_out = nnx.LayerNorm(hidden, dtype=dtype, rngs=rngs)
        out_features = in_features if out_features is None else out_features
        out_features = 2 * out_features if learn_sigma else out_features
        self.proj_out = linear(hidden, out_features, zero_init=True, rngs=rngs, dtype=dtype)

    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        cond: jax.Array | None = None,
        train: bool = False,
        *,
        rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        """Predict from noisy points.

        Args:
            x: [B, D] noisy points.
            t: [B] timesteps (int indices or continuous times), embedded as given.
            cond: [B] int class labels, num_classes for the null label; None = all null.
            train: enables dropout, whose keys come from `rngs` ('dropout' stream).
            rngs: e.g. `nnx.Rngs(dropout=key)`; may be None when not training.

        Returns:
            [B, D], or [B, 2D] with learn_sigma.
        """
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"x: MLP expects [B, {self.in_features}], got {x.shape}")
        emb = self.cond(t, cond)  # [B, hidden]
        h = self.proj_in(x)  # [B, hidden]
        for block in self.blocks:
            h = block(h, emb, train, rngs)
        return self.proj_out(nnx.silu(self.norm_out(h))).astype(x.dtype)
