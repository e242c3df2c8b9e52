"""DiT, the Diffusion Transformer of Peebles & Xie 2023 (arXiv 2212.09748), in Flax NNX, NHWC.

The network of the paper's Figure 3 and of the official PyTorch code (facebookresearch/DiT,
`models.py`): patchify the [H, W, C] input into T = (H/p)^2 tokens (§3.2 'Patchify'), add
fixed 2-D sine-cosine position embeddings (MAE's `get_2d_sincos_pos_embed`), run N
transformer blocks conditioned through adaLN-Zero on c = embed(t) + embed(y) (§3.2 'DiT
block design'), then an adaptive final LayerNorm, a linear decoder of each token to a
p x p x C' patch and the inverse of patchify (§3.2 'Transformer decoder'). The weights are
initialised as the official `initialize_weights`. DiT has no dropout.

Parameter counts: the official code keeps the fixed position embedding as a frozen
`nn.Parameter`, so its printed counts include T * hidden_size extra numbers (DiT-XL/2 on
32x32x4 latents: 675,129,632 = 674,834,720 + 256 * 1152). Here it is a constant computed at
trace time, not a parameter, and `count_params` gives 674,834,720 (Table 4: 675M).

Performance options: `dtype=jnp.bfloat16` runs the matmuls, attention and activations in
bfloat16 with float32 parameters (cast at use), while the residual stream, the LayerNorm
statistics and the final layer stay float32; `remat=True` recomputes each block's
activations in the backward pass (`nnx.remat`), trading compute for memory.

Text and context conditioning (the condition pytree of DESIGN §6, as the U-Net takes it), the way
PixArt-α adds it to DiT (Chen et al. 2023, arXiv 2310.00426, §2.3 and Figure 4): with
`context_dim`, every block gets a multi-head cross-attention to `cond['context']` [B, L, D_ctx]
between its self-attention and its MLP, x = x + CrossAttn(x, context), on the un-normalised
stream and without adaLN modulation. Its output projection starts at zero (PixArt's
`initialize_weights`), so a fresh model computes exactly what the DiT without it computes.
`pooled_dim` adds a projection of `cond['pooled']` [B, D] to c; `text_encoder` builds a jointly
trained `models.text.TextEncoder` of `cond['tokens']` whose context feeds the cross-attention and
whose pooled output joins c. Without these arguments the DiT, its parameters and outputs, are
those of the paper. The cross-attention is `models.attention.Attention` (diffusers' names), so it
has no bias on Q, K and V, where PixArt's `q_linear`/`kv_linear` have one.
"""

from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import DTypeLike

from diffusion_jax import conditioning, repa
from diffusion_jax.errors import ConfigError
from diffusion_jax.models import attention, ring_attention
from diffusion_jax.models.layers import ConditionEmbedder, zeros_init
from diffusion_jax.models.text import build_text_encoder, split_condition

AttentionImpl = Literal["xla", "cudnn"]

FREQUENCY_EMBEDDING_SIZE = 256  # width of the sinusoidal timestep embedding (official `TimestepEmbedder`)

# Model sizes of Table 1: name -> (depth N, hidden size d, heads).
DIT_SIZES: dict[str, tuple[int, int, int]] = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
PATCH_SIZES = (2, 4, 8)  # the patch sizes p studied in the paper (§3.2, Figure 4)
VARIANTS: tuple[str, ...] = tuple(f"DiT-{size}/{p}" for size in DIT_SIZES for p in PATCH_SIZES)

# Official `_basic_init`: xavier_uniform weights and zero biases for every nn.Linear.
xavier_uniform = nnx.initializers.xavier_uniform()
# The patch embedding conv initialised "like nn.Linear": xavier_uniform on its weight viewed as
# a [hidden, C*p*p] matrix, i.e. fan_in = p*p*C and fan_out = hidden. Flax's `xavier_uniform` on
# a [p, p, C, hidden] kernel would use fan_out = p*p*hidden, hence the explicit axes.
patch_embed_init = nnx.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1, 2), out_axis=-1)
embedding_init = nnx.initializers.normal(0.02)  # label table and timestep MLP weights


def get_1d_sincos_pos_embed(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """1-D sine-cosine embedding of positions (Vaswani et al. 2017, §3.5; MAE's `util/pos_embed.py`).

    emb[m, k] = sin(pos_m * w_k), emb[m, embed_dim/2 + k] = cos(pos_m * w_k) with
    w_k = 10000^(-k / (embed_dim/2)), k = 0 .. embed_dim/2 - 1.

    Args:
        embed_dim: even output width.
        pos: positions of any shape, flattened to [M].

    Returns:
        [M, embed_dim] float64.
    """
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2))  # [D/2]
    out = np.outer(pos.reshape(-1).astype(np.float64), omega)  # [M, D/2]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # [M, D]


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """The fixed position embedding of DiT (§3.2 'Patchify'; MAE's `get_2d_sincos_pos_embed`).

    Token k = i * grid_size + j (row i, column j, patchify order) gets the 1-D embedding of its
    column j in the first embed_dim/2 channels and of its row i in the last embed_dim/2 (MAE's
    `np.meshgrid(grid_w, grid_h)` puts the column coordinate first).

    Args:
        embed_dim: hidden size, a multiple of 4.
        grid_size: tokens per side, H / p.

    Returns:
        [grid_size**2, embed_dim] float32 (computed in float64, as the official code).
    """
    rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")  # [g, g] each
    emb = np.concatenate(
        [get_1d_sincos_pos_embed(embed_dim // 2, cols), get_1d_sincos_pos_embed(embed_dim // 2, rows)], axis=1
    )  # [g*g, D]
    return emb.astype(np.float32)


def unpatchify(tokens: jax.Array, patch_size: int, channels: int) -> jax.Array:
    """[B, T, p*p*C] tokens -> [B, H, W, C] with H = W = sqrt(T) * p (the official `unpatchify`).

    Token k = i * w + j holds the patch at rows i*p .. i*p+p-1 and columns j*p .. j*p+p-1, its
    features ordered (row in patch, column in patch, channel), as `einsum('nhwpqc->nchpwq')`.
    """
    b, t, _ = tokens.shape
    h = w = int(round(t**0.5))
    x = tokens.reshape(b, h, w, patch_size, patch_size, channels)  # [B, h, w, p, q, C]
    x = x.transpose(0, 1, 3, 2, 4, 5)  # [B, h, p, w, q, C]
    return x.reshape(b, h * patch_size, w * patch_size, channels)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """adaLN's modulation x * (1 + scale) + shift (§3.2 'Adaptive layer norm'); [B, T, D], [B, 1, D]."""
    return x * (1 + scale) + shift


def _linear(in_features: int, out_features: int, *, zero: bool = False, rngs: nnx.Rngs, dtype: DTypeLike) -> nnx.Linear:
    """nn.Linear with DiT's init: xavier_uniform (or zeros for adaLN-Zero outputs), zero bias, float32 params."""
    return nnx.Linear(
        in_features,
        out_features,
        kernel_init=zeros_init if zero else xavier_uniform,
        bias_init=zeros_init,
        dtype=dtype,
        param_dtype=jnp.float32,
        rngs=rngs,
    )


def _layer_norm(hidden_size: int, *, rngs: nnx.Rngs, dtype: DTypeLike) -> nnx.LayerNorm:
    """LayerNorm without affine parameters, eps 1e-6; statistics in float32, output in `dtype`.

    Two-pass variance (`use_fast_variance=False`) as PyTorch's LayerNorm. Without scale and
    bias it holds no parameters and draws nothing from `rngs`.
    """
    return nnx.LayerNorm(
        hidden_size,
        epsilon=1e-6,
        use_bias=False,
        use_scale=False,
        use_fast_variance=False,
        dtype=dtype,
        rngs=rngs,
    )


class Attention(nnx.Module):
    """Multi-head self-attention over the tokens (timm's `Attention` with qkv_bias=True).

    One qkv projection split into heads, softmax(QK^T/sqrt(d))V (`ring_attention.self_attention`:
    `jax.nn.dot_product_attention`, or ring attention when `mesh.sequence` splits the tokens), an output
    projection.
    """

    def __init__(
        self, hidden_size: int, num_heads: int, *, impl: AttentionImpl | None, rngs: nnx.Rngs, dtype: DTypeLike
    ):
        self.num_heads = num_heads
        self.impl = impl
        self.qkv = _linear(hidden_size, 3 * hidden_size, rngs=rngs, dtype=dtype)
        self.proj = _linear(hidden_size, hidden_size, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, T, D] -> [B, T, D]."""
        b, t, d = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.num_heads, d // self.num_heads)  # [B, T, 3, N, D/N]
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # each [B, T, N, D/N]
        out = ring_attention.self_attention(q, k, v, implementation=self.impl)  # [B, T, N, D/N]
        return self.proj(out.reshape(b, t, d))


class Mlp(nnx.Module):
    """fc1 -> GELU (tanh approximation) -> fc2 (timm's `Mlp` as DiT uses it)."""

    def __init__(self, hidden_size: int, mlp_hidden: int, *, rngs: nnx.Rngs, dtype: DTypeLike):
        self.fc1 = _linear(hidden_size, mlp_hidden, rngs=rngs, dtype=dtype)
        self.fc2 = _linear(mlp_hidden, hidden_size, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, T, D] -> [B, T, D]."""
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))


class DiTBlock(nnx.Module):
    """A transformer block with adaLN-Zero conditioning (§3.2 'adaLN-Zero block', Figure 3).

    (β1, γ1, α1, β2, γ2, α2) = Linear(SiLU(c)), the Linear zero-initialised so that every α is
    0 and the block starts as the identity;
    x = x + α1 * Attn(LN(x) * (1 + γ1) + β1); x = x + α2 * MLP(LN(x) * (1 + γ2) + β2).
    With `context_dim`, PixArt-α's cross-attention (arXiv 2310.00426, §2.3) sits between the two:
    x = x + CrossAttn(x, context), `cross_attn` a `models.attention.Attention` with xavier_uniform
    Q/K/V and a zero-initialised output projection `to_out.0`; without it `cross_attn` is None.
    The residual stream x stays float32 whatever the compute dtype.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float,
        *,
        attention_impl: AttentionImpl | None,
        rngs: nnx.Rngs,
        dtype: DTypeLike,
        context_dim: int | None = None,
    ):
        self.context_dim = context_dim
        self.norm1 = _layer_norm(hidden_size, rngs=rngs, dtype=dtype)
        self.attn = Attention(hidden_size, num_heads, impl=attention_impl, rngs=rngs, dtype=dtype)
        cross_attn = None  # one assignment below: nnx makes an attribute first set to None static
        if context_dim is not None:
            cross_attn = _cross_attention(
                hidden_size, num_heads, context_dim, attention_impl=attention_impl, rngs=rngs, dtype=dtype
            )
        self.cross_attn = cross_attn
        self.norm2 = _layer_norm(hidden_size, rngs=rngs, dtype=dtype)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), rngs=rngs, dtype=dtype)
        self.adaln_modulation = _linear(hidden_size, 6 * hidden_size, zero=True, rngs=rngs, dtype=dtype)

    def __call__(
        self, x: jax.Array, c: jax.Array, context: jax.Array | None = None, context_mask: jax.Array | None = None
    ) -> jax.Array:
        """x: [B, T, D] float32, c: [B, D], context [B, L, context_dim] and context_mask bool [B, L]
        (or None: no cross-attention, as an empty or all-masked context) -> [B, T, D] float32."""
        attention.check_context(context, context_mask, batch=x.shape[0], context_dim=self.context_dim)
        mod = self.adaln_modulation(nnx.silu(c))[:, None, :]  # [B, 1, 6D]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)  # [B, 1, D]
        x = x + (gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))).astype(x.dtype)
        if context is not None:
            x = x + self.cross_attn(x, context, context_mask).astype(x.dtype)
        x = x + (gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))).astype(x.dtype)
        return x


def _cross_attention(
    hidden_size: int,
    num_heads: int,
    context_dim: int,
    *,
    attention_impl: AttentionImpl | None,
    rngs: nnx.Rngs,
    dtype: DTypeLike,
) -> attention.Attention:
    """PixArt-α's block cross-attention with its init: xavier_uniform Q, K, V (DiT's `_basic_init`,
    which PixArt applies to every linear) and a zero output projection, weight and bias."""
    layer = attention.Attention(
        hidden_size,
        context_dim=context_dim,
        num_heads=num_heads,
        head_dim=hidden_size // num_heads,
        attention_impl=attention_impl,
        rngs=rngs,
        dtype=dtype,
    )
    for projection in (layer.to_q, layer.to_k, layer.to_v):
        projection.kernel.set_value(xavier_uniform(rngs.params(), projection.kernel.shape, jnp.float32))
    layer.to_out[0].kernel.set_value(jnp.zeros_like(layer.to_out[0].kernel[...]))  # the bias starts at zero
    return layer


class FinalLayer(nnx.Module):
    """Adaptive LayerNorm then a linear decoder of each token to a p x p x C' patch (§3.2 'Transformer decoder').

    (β, γ) = Linear(SiLU(c)); out = Linear(LN(x) * (1 + γ) + β). Both linears are
    zero-initialised, so a new DiT outputs zeros. Runs in float32.
    """

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, *, rngs: nnx.Rngs):
        self.norm_final = _layer_norm(hidden_size, rngs=rngs, dtype=jnp.float32)
        self.linear = _linear(hidden_size, patch_size * patch_size * out_channels, zero=True, rngs=rngs,
                              dtype=jnp.float32)
        self.adaln_modulation = _linear(hidden_size, 2 * hidden_size, zero=True, rngs=rngs, dtype=jnp.float32)

    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        """x: [B, T, D], c: [B, D] -> [B, T, p*p*C'] float32."""
        shift, scale = jnp.split(self.adaln_modulation(nnx.silu(c))[:, None, :], 2, axis=-1)  # [B, 1, D] each
        return self.linear(modulate(self.norm_final(x), shift, scale))


def _apply_block(
    block: DiTBlock, x: jax.Array, c: jax.Array, context: jax.Array | None, context_mask: jax.Array | None
) -> jax.Array:
    """block(x, c, context, context_mask) as a function of the block, the form `nnx.remat` transforms."""
    return block(x, c, context, context_mask)


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


class DiT(nnx.Module):
    """Diffusion Transformer (Peebles & Xie 2023, arXiv 2212.09748) for NHWC images or latents.

    x [B, H, W, C] -> patch embedding (conv with kernel = stride = p) + fixed 2-D sin-cos
    position embedding -> `depth` adaLN-Zero DiTBlocks conditioned on c = t_emb + y_emb ->
    FinalLayer -> unpatchify -> [B, H, W, C'] with C' = 2C under `learn_sigma` (the ε
    prediction, then the variance interpolation v of improved DDPM, as the paper's §3.1).

    The conditioning is the codebase's `ConditionEmbedder`, whose structure is DiT's:
    a 256-wide sinusoidal timestep embedding -> Linear -> SiLU -> Linear, plus a label table
    with num_classes + 1 rows (the last is the null label of classifier-free guidance; the
    training step drops labels, the model always has the row). Its weights are re-drawn from
    N(0, 0.02^2) as in the official `initialize_weights`.

    Args:
        image_size: height = width of the input; a multiple of `patch_size`.
        in_channels: channels C of the input (4 for the paper's VAE latents).
        out_channels: channels of the prediction (None: in_channels; VDM's Fourier-feature inputs have more).
        patch_size: p; T = (image_size / p)^2 tokens.
        hidden_size: token width d, a multiple of 4 (for the 2-D sin-cos embedding) and of `num_heads`.
        depth: number of DiT blocks N.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / d.
        num_classes: enables class conditioning with a null label (index num_classes).
        learn_sigma: also output improved DDPM's variance interpolation, doubling the channels.
        dtype: computation dtype of the blocks and embedders (e.g. jnp.bfloat16); parameters,
            the residual stream, LayerNorm statistics and the final layer stay float32.
        remat: recompute each block's activations in the backward pass (`nnx.remat`).
        attention_impl: `implementation` of `jax.nn.dot_product_attention`: None (JAX's choice,
            which in jax 0.10 is always XLA), 'xla', or 'cudnn' (fused flash attention on NVIDIA
            GPUs; needs bfloat16/float16 and head_dim <= 128).
        context_dim: the width D_ctx of a token context `cond['context']` [B, L, D_ctx]: every block
            gets PixArt-α's cross-attention `blocks.{i}.cross_attn` (`to_q`, `to_k`, `to_v` kernels,
            no bias; `to_out.0` kernel and bias, zero-initialised). None: no cross-attention, and a
            context is a ValueError.
        pooled_dim: the width of a pooled embedding `cond['pooled']` [B, D], projected
            (`cond.pooled`) and added to c.
        text_encoder: a jointly trained `models.text.TextEncoder` of `cond['tokens']` (parameters
            `text_encoder.*`): a dict of its `vocab_size`, `max_len`, `width`, `depth`, `num_heads`,
            as the U-Net's. Its context feeds the cross-attention (context_dim = width) and its
            pooled output joins c (pooled_dim = width).
        interval_embedding: a MeanFlow network u(z, r, t) (Geng et al. 2025): `cond['interval']` [B], h = t - r,
            joins c (`layers.ConditionEmbedder`); `training.objective='meanflow'` sets it.
        repa_layer: REPA's tap (`diffusion_jax.repa`), the output of block k (1-based; the paper's SiT-XL/2: 8);
            with `repa_dim` (the encoder's width, set from `repa.encoder`) a projector to it is built and, while
            training, sown as `nnx.Intermediate('repa')` [B, grid, grid, repa_dim].
        rngs: parameter initialisation keys; the model keeps no RNG state.

    Raises:
        ConfigError: when `patch_size` does not divide `image_size`, `num_heads` does not divide
            `hidden_size`, `hidden_size` is not a multiple of 4, `dtype` is not a float type,
            `attention_impl` is unknown, `text_encoder` lacks a field, or `context_dim` differs from
            the text encoder's width.
    """

    def __init__(
        self,
        *,
        image_size: int,
        in_channels: int,
        patch_size: int = 2,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int | None = None,
        learn_sigma: bool = False,
        dtype: DTypeLike = jnp.float32,
        remat: bool = False,
        attention_impl: AttentionImpl | None = None,
        context_dim: int | None = None,
        pooled_dim: int | None = None,
        text_encoder: dict | None = None,
        out_channels: int | None = None,
        interval_embedding: bool = False,
        repa_layer: int | None = None,
        repa_dim: int | None = None,
        rngs: nnx.Rngs,
    ):
        if patch_size < 1 or image_size % patch_size:
            raise ConfigError(
                f"model.patch_size: {patch_size} does not divide data.image_size={image_size}; "
                f"use one of {_divisors(image_size)}"
            )
        if hidden_size < 4 or hidden_size % 4:
            below = max(hidden_size, 0) // 4 * 4
            nearest = f"{below} or {below + 4}" if below else "4"
            raise ConfigError(
                f"model.hidden_size: {hidden_size} is not a positive multiple of 4, which the 2-D sin-cos "
                f"position embedding needs; use e.g. {nearest}"
            )
        if num_heads < 1 or hidden_size % num_heads:
            raise ConfigError(
                f"model.num_heads: {num_heads} does not divide model.hidden_size={hidden_size}; "
                f"use one of {_divisors(hidden_size)}"
            )
        if attention_impl not in (None, "xla", "cudnn"):
            raise ConfigError(f"model.attention_impl: got {attention_impl!r}; choose None, 'xla' or 'cudnn'")
        dtype = jnp.dtype(dtype)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ConfigError(f"model.dtype: got {dtype}; use a float type such as 'float32' or 'bfloat16'")
        self.image_size = image_size
        self.in_channels = in_channels
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        out_channels = in_channels if out_channels is None else out_channels
        self.out_channels = 2 * out_channels if learn_sigma else out_channels
        self.remat = remat
        if text_encoder is not None:
            context_dim = context_dim or text_encoder.get("width")
        self.context_dim = context_dim

        self.x_embedder = nnx.Conv(
            in_channels,
            hidden_size,
            (patch_size, patch_size),
            strides=patch_size,
            padding="VALID",
            kernel_init=patch_embed_init,
            bias_init=zeros_init,
            dtype=dtype,
            param_dtype=jnp.float32,
            rngs=rngs,
        )
        self.text_encoder = (
            None if text_encoder is None else build_text_encoder(text_encoder, context_dim, rngs=rngs, dtype=dtype)
        )
        if self.text_encoder is not None:
            pooled_dim = self.text_encoder.width  # its pooled output joins c, as in the U-Net
        self.cond = ConditionEmbedder(
            FREQUENCY_EMBEDDING_SIZE, hidden_size, num_classes, pooled_dim=pooled_dim, interval=interval_embedding,
            rngs=rngs, dtype=dtype,
        )
        self._init_condition(rngs)
        self.blocks = nnx.List(
            [
                DiTBlock(
                    hidden_size,
                    num_heads,
                    mlp_ratio,
                    attention_impl=attention_impl,
                    rngs=rngs,
                    dtype=dtype,
                    context_dim=context_dim,
                )
                for _ in range(depth)
            ]
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, rngs=rngs)
        if repa_dim is not None:
            repa.check_layer(repa_layer, depth, "the blocks' outputs")
        self.repa_layer = repa_layer if repa_dim is not None else None
        self.repa_projector = (None if self.repa_layer is None
                               else repa.Projector(hidden_size, repa_dim, rngs=rngs, dtype=dtype))

    def _init_condition(self, rngs: nnx.Rngs) -> None:
        """DiT's init of the embedders: timestep MLP weights and label table ~ N(0, 0.02^2), zero biases."""
        tables = [self.cond.time.dense0.kernel, self.cond.time.dense1.kernel]
        if self.cond.label is not None:
            tables.append(self.cond.label.embed.embedding)
        for table in tables:
            table.set_value(embedding_init(rngs.params(), table.shape, jnp.float32))

    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        cond: conditioning.Cond = None,
        train: bool = False,
        *,
        rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        """Predict from noisy images (DiT's `forward`).

        Args:
            x: [B, H, W, C] noisy images or latents, H = W = image_size, C = in_channels.
            t: [B] timesteps (int indices or continuous times), embedded as given.
            cond: the condition (`diffusion_jax.conditioning`): [B] int class labels (num_classes is
                the null label), or a dict of 'label', 'tokens'/'token_mask' (with `text_encoder`),
                'context'/'context_mask' (with `context_dim`), 'pooled' (with `pooled_dim` or
                `text_encoder`); a missing entry (or None) is the null condition. An entry the model
                was built without is a ValueError naming it.
            train: unused (DiT has no dropout); part of the common model call.
            rngs: unused, as `train`.

        Returns:
            [B, H, W, C], or [B, H, W, 2C] with learn_sigma, float32.
        """
        expected = (self.image_size, self.image_size, self.in_channels)
        if x.shape[1:] != expected:
            raise ValueError(f"x: DiT expects [B, {', '.join(map(str, expected))}], got {x.shape}")
        b = x.shape[0]
        grid = self.image_size // self.patch_size
        pos = jnp.asarray(get_2d_sincos_pos_embed(self.hidden_size, grid))  # [T, D] constant, T = grid^2
        h = self.x_embedder(x).reshape(b, grid * grid, self.hidden_size)  # [B, T, D], row-major patches
        h = ring_attention.shard_tokens(h.astype(jnp.float32) + pos)  # [B, T, D] float32 residual stream
        entries, context = split_condition(cond, self.text_encoder)
        context, context_mask = context or (None, None)  # [B, L, D_ctx], [B, L] bool
        attention.check_context(context, context_mask, batch=b, context_dim=self.context_dim)
        c = self.cond(t, entries)  # [B, D]
        apply = nnx.remat(_apply_block) if self.remat else _apply_block
        for depth, block in enumerate(self.blocks, start=1):
            h = ring_attention.shard_tokens(apply(block, h, c, context, context_mask))  # [B, T, D]
            if train and depth == self.repa_layer:  # REPA's projection of block k's tokens, on their grid
                self.sow(nnx.Intermediate, "repa", self.repa_projector(h).reshape(b, grid, grid, -1))
        out = self.final_layer(h, c)  # [B, T, p*p*C']
        return unpatchify(out, self.patch_size, self.out_channels)  # [B, H, W, C']


def variant(name: str) -> Callable[..., DiT]:
    """The constructor of a named configuration of the paper, e.g. 'DiT-XL/2' (Table 1, Table 4).

    'DiT-{S,B,L,XL}/{2,4,8}' fixes depth, hidden_size, num_heads (Table 1) and patch_size; every
    other DiT argument is passed through. A conflicting value for a fixed field is a ConfigError
    (use model.name='dit' to choose sizes freely).
    """
    if name not in VARIANTS:
        raise ConfigError(f"model.name: unknown DiT variant {name!r}; choose one of: {', '.join(VARIANTS)}")
    size, patch = name.removeprefix("DiT-").split("/")
    depth, hidden_size, num_heads = DIT_SIZES[size]
    fixed = dict(depth=depth, hidden_size=hidden_size, num_heads=num_heads, patch_size=int(patch))

    def make(**kwargs) -> DiT:
        for field, value in fixed.items():
            if field in kwargs and kwargs[field] != value:
                raise ConfigError(
                    f"model.{field}: {name} has {field}={value}, got {kwargs[field]!r}; "
                    "remove the field or use model.name='dit'"
                )
        return DiT(**{**kwargs, **fixed})

    make.__name__ = make.__qualname__ = name
    make.__doc__ = f"{name}: DiT with {', '.join(f'{k}={v}' for k, v in fixed.items())}."
    return make
