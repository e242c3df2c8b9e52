"""DINOv2, the self-supervised ViT of Oquab et al. 2023 (arXiv 2304.07193), in Flax NNX, NHWC; a frozen feature
extractor (REPA's encoder, `diffusion_jax.repa`).

The network of Hugging Face's `Dinov2Model` / `Dinov2WithRegistersModel` (the `facebook/dinov2-*` checkpoints,
`convert.dinov2` imports them), itself facebookresearch/dinov2's `DinoVisionTransformer`: a p x p patch embedding
(a stride-p convolution, p = 14), a CLS token, learnt position embeddings of the pretraining grid resampled to the
input's patch grid (§5 trains at 518 px, 37 x 37 patches), optional register tokens (Darcet et al. 2024, arXiv
2309.16588: tokens without position embedding between the CLS token and the patches), pre-norm transformer
blocks x = x + γ1 ⊙ Attn(LN(x)), x = x + γ2 ⊙ MLP(LN(x)) with LayerScale γ (Touvron et al. 2021), a GELU MLP or,
for ViT-g, a SwiGLU one (§4, Shazeer 2020), and a final LayerNorm. `DINOv2(images)` returns the normalised patch
tokens [B, h, w, D] (`x_norm_patchtokens`, which REPA aligns to); inputs are ImageNet-normalised RGB.

The position embeddings are resampled as the checkpoint's Hugging Face class does (`interpolate_pos_encoding`),
exactly: torch's bicubic `interpolate(size=grid, align_corners=False)`, plain (a = -0.75, clamped borders) for
`Dinov2Model`, `antialias=True` (a = -0.5, weights renormalised over the taps inside the image, PIL's filter) for
`Dinov2WithRegistersModel`. `resample_matrix` builds that map as a [out, in] matrix per axis from the static
shapes, so the resampling is two small matmuls of the parameter. `jax.image.resize`'s cubic is Keys' a = -0.5
without clamping, a different map.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion_jax.models import dit

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the normalisation DINOv2 was trained with (its `make_normalize_transform`)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _keys_cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel W(x) with parameter a (torch's bicubic: -0.75; its antialiased one: -0.5)."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((x - 5) * x + 8) * x * a - 4 * a
    return np.where(x < 1, near, np.where(x < 2, far, 0)).astype(x.dtype)


def resample_matrix(size_in: int, size_out: int, antialias: bool) -> np.ndarray:
    """[size_out, size_in] float32: torch's `interpolate(mode='bicubic', size=..., align_corners=False)` along one
    axis, with or without `antialias` (ATen's `upsample_bicubic2d` and `_upsample_bicubic2d_aa` CPU kernels, whose
    source coordinates and weights are float32 for float32 input, as here)."""
    f32 = np.float32
    scale = f32(size_in) / f32(size_out)
    out = np.arange(size_out, dtype=f32)
    matrix = np.zeros((size_out, size_in), f32)
    rows = np.arange(size_out)[:, None]
    if antialias:  # a filter stretched by the scale when shrinking, renormalised over the taps inside [0, size_in)
        support = f32(2) * max(scale, f32(1))
        center = scale * (out + f32(0.5))
        lo = np.maximum((center - support + f32(0.5)).astype(np.int64), 0)  # C's truncating int(), as ATen
        hi = np.minimum((center + support + f32(0.5)).astype(np.int64), size_in)
        taps = lo[:, None] + np.arange(int((hi - lo).max()))[None, :]
        weights = _keys_cubic((taps.astype(f32) - center[:, None] + f32(0.5)) / max(scale, f32(1)), -0.5)
        weights = np.where(taps < hi[:, None], weights, f32(0))
        weights /= weights.sum(axis=1, keepdims=True)
        np.add.at(matrix, (rows, np.minimum(taps, size_in - 1)), weights)
        return matrix
    real = scale * (out + f32(0.5)) - f32(0.5)  # no clamping at 0 for the cubic
    base = np.floor(real)
    t = (real - base)[:, None]
    taps = base[:, None].astype(np.int64) + np.arange(-1, 3)[None, :]
    weights = _keys_cubic(t - np.arange(-1, 3, dtype=f32)[None, :], -0.75)  # distances t + 1, t, 1 - t, 2 - t
    np.add.at(matrix, (rows, np.clip(taps, 0, size_in - 1)), weights)  # the border taps repeat the edge
    return matrix


class LayerScale(nnx.Module):
    """x ⊙ γ, a learnt per-channel scale of a residual branch (CaiT's LayerScale, Touvron et al. 2021)."""

    def __init__(self, dim: int, init: float = 1.0):
        self.gamma = nnx.Param(jnp.full((dim,), init, jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x * self.gamma[...]


class SwiGLU(nnx.Module):
    """ViT-g's feed-forward: W_out (SiLU(x W_gate) ⊙ x W_up), the gate and up projections fused in `weights_in`
    (first half the gate)."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs):
        self.weights_in = nnx.Linear(dim, 2 * hidden, rngs=rngs)
        self.weights_out = nnx.Linear(hidden, dim, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        gate, up = jnp.split(self.weights_in(x), 2, axis=-1)
        return self.weights_out(nnx.silu(gate) * up)


class Mlp(nnx.Module):
    """fc2(GELU(fc1(x))), the exact (erf) GELU."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(dim, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, dim, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class Block(nnx.Module):
    """x = x + γ1 ⊙ Attn(LN(x)); x = x + γ2 ⊙ MLP(LN(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, swiglu: bool, eps: float, *, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(dim, epsilon=eps, rngs=rngs)
        # timm's fused-qkv attention, the DiT's (`models.dit.Attention`: qkv and proj with biases)
        self.attn = dit.Attention(dim, num_heads, impl=None, rngs=rngs, dtype=jnp.float32)
        self.ls1 = LayerScale(dim)
        self.norm2 = nnx.LayerNorm(dim, epsilon=eps, rngs=rngs)
        self.mlp = SwiGLU(dim, mlp_hidden, rngs=rngs) if swiglu else Mlp(dim, mlp_hidden, rngs=rngs)
        self.ls2 = LayerScale(dim)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DINOv2(nnx.Module):
    """DINOv2's ViT (see the module docstring): ImageNet-normalised images [B, H, W, C] -> the final-LayerNorm'd
    patch tokens [B, H // p, W // p, D].

    Args:
      hidden_size: D (ViT-S/B/L/g: 384, 768, 1024, 1536).
      depth: the number of blocks (12, 12, 24, 40).
      num_heads: attention heads (D / 64).
      mlp_hidden: the MLP's hidden width (4 D; SwiGLU's: its gate's width).
      patch_size: p (14).
      image_size: the pretraining resolution, whose (image_size / p)^2 patch grid the position embeddings cover.
      num_register_tokens: register tokens (0: none, `Dinov2Model`; `Dinov2WithRegistersModel`: 4).
      swiglu: a SwiGLU feed-forward (ViT-g) instead of the GELU MLP.
      antialias: resample the position embeddings as `Dinov2WithRegistersModel` does (see the module docstring).
      layer_norm_eps: every LayerNorm's epsilon (1e-6).
      in_channels: the images' channels (3).
    """

    def __init__(
        self,
        *,
        hidden_size: int,
        depth: int,
        num_heads: int,
        mlp_hidden: int,
        patch_size: int = 14,
        image_size: int = 518,
        num_register_tokens: int = 0,
        swiglu: bool = False,
        antialias: bool = False,
        layer_norm_eps: float = 1e-6,
        in_channels: int = 3,
        rngs: nnx.Rngs,
    ):
        self.patch_size, self.antialias = patch_size, antialias
        self.grid = image_size // patch_size  # the position embeddings' grid side
        self.patch_embed = nnx.Conv(in_channels, hidden_size, (patch_size, patch_size), strides=patch_size,
                                    padding="VALID", rngs=rngs)
        init = nnx.initializers.truncated_normal(0.02)
        self.cls_token = nnx.Param(init(rngs.params(), (1, 1, hidden_size)))
        self.pos_embed = nnx.Param(init(rngs.params(), (1, 1 + self.grid**2, hidden_size)))
        self.register_tokens = (nnx.Param(jnp.zeros((1, num_register_tokens, hidden_size)))
                                if num_register_tokens else None)
        self.blocks = nnx.List([Block(hidden_size, num_heads, mlp_hidden, swiglu, layer_norm_eps, rngs=rngs)
                                for _ in range(depth)])
        self.norm = nnx.LayerNorm(hidden_size, epsilon=layer_norm_eps, rngs=rngs)

    def position_embeddings(self, h: int, w: int) -> jax.Array:
        """[1, 1 + h w, D]: the CLS token's embedding, then the patch grid's resampled to h x w."""
        pos = self.pos_embed[...]
        if (h, w) == (self.grid, self.grid):
            return pos
        patches = pos[0, 1:].reshape(self.grid, self.grid, -1)  # [g, g, D]
        rows = jnp.asarray(resample_matrix(self.grid, h, self.antialias), jnp.float32)  # [h, g]
        cols = jnp.asarray(resample_matrix(self.grid, w, self.antialias), jnp.float32)  # [w, g]
        patches = jnp.einsum("ia,abd,jb->ijd", rows, patches, cols, precision=jax.lax.Precision.HIGHEST)
        return jnp.concatenate([pos[:, :1], patches.reshape(1, h * w, -1)], axis=1)

    def __call__(self, images: jax.Array) -> jax.Array:
        """images [B, H, W, C] (ImageNet-normalised) -> patch tokens [B, H // p, W // p, D]."""
        x = self.patch_embed(images)  # [B, h, w, D]
        b, h, w, d = x.shape
        x = jnp.concatenate([jnp.broadcast_to(self.cls_token[...], (b, 1, d)), x.reshape(b, h * w, d)], axis=1)
        x = x + self.position_embeddings(h, w)  # [B, 1 + h w, D]
        registers = 0 if self.register_tokens is None else self.register_tokens.shape[1]
        if registers:  # after the CLS token, without a position embedding
            x = jnp.concatenate([x[:, :1], jnp.broadcast_to(self.register_tokens[...], (b, registers, d)), x[:, 1:]],
                                axis=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 1 + registers:].reshape(b, h, w, d)

