"""A transformer text encoder τ_θ for token conditioning, in Flax NNX.

Latent diffusion (Rombach et al. 2022, arXiv 2112.10752, §3.3) conditions its denoiser on a
sequence τ_θ(y) ∈ R^{M × d_τ} through cross-attention, where for text τ_θ is a transformer
encoder over the tokenised prompt, trained jointly with the denoiser (their LAION model: 32
layers of width 1280 over BERT tokens). This is that encoder at any size: token embedding plus a
learned position embedding, `depth` pre-LN transformer encoder blocks (Vaswani et al. 2017,
arXiv 1706.03762, §3.1-3.3, with the LayerNorm before each sub-layer as GPT-2 and ViT place it),
and a final LayerNorm.

Outputs, matching the conditioning pytree (DESIGN.md §6): `context` [B, L, width] for
cross-attention, zero at padded positions, goes to `cond['context']` with the input mask as
`cond['context_mask']`; `pooled` [B, width], the mean of `context` over the real tokens, goes
to `cond['pooled']`. Padded positions never influence either: keys at padded positions are
masked out of every attention and excluded from the mean, so the token ids there do not matter.
A row with no real token gives zeros.

Frozen or trainable is the caller's choice (e.g. `nnx.state(encoder, nnx.Param)` left out of
the optimiser); the outputs of a frozen encoder can be computed once and stored as arrays.
The residual stream, LayerNorm statistics and outputs are float32; `dtype=jnp.bfloat16` runs the
matmuls and attention in bfloat16 with float32 parameters.
"""

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import DTypeLike

from diffusion_jax import conditioning
from diffusion_jax.errors import ConfigError
from diffusion_jax.models.layers import zeros_init

xavier_uniform = nnx.initializers.xavier_uniform()  # linear layers, as ViT / DiT
embedding_init = nnx.initializers.normal(0.02)  # token and position tables, as BERT / GPT-2


def _linear(in_features: int, out_features: int, *, rngs: nnx.Rngs, dtype: DTypeLike) -> nnx.Linear:
    """A dense layer: xavier_uniform weights, zero bias, float32 parameters, compute in `dtype`."""
    return nnx.Linear(
        in_features,
        out_features,
        kernel_init=xavier_uniform,
        bias_init=zeros_init,
        dtype=dtype,
        param_dtype=jnp.float32,
        rngs=rngs,
    )


def _layer_norm(width: int, *, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """LayerNorm with scale and bias, eps 1e-6, computed and returned in float32."""
    return nnx.LayerNorm(width, epsilon=1e-6, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)


class MaskedSelfAttention(nnx.Module):
    """Multi-head self-attention whose keys are restricted to real tokens (Vaswani et al. 2017, §3.2).

    softmax(Q K^T / sqrt(d_head) + mask) V per head, through `jax.nn.dot_product_attention`,
    with the key padding mask broadcast over heads and queries.
    """

    def __init__(self, width: int, num_heads: int, *, rngs: nnx.Rngs, dtype: DTypeLike):
        self.num_heads = num_heads
        self.dtype = dtype
        self.qkv = _linear(width, 3 * width, rngs=rngs, dtype=dtype)
        self.proj = _linear(width, width, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """x [B, L, D], mask bool [B, L] (True = real token) -> [B, L, D]."""
        b, l, d = x.shape
        qkv = self.qkv(x.astype(self.dtype)).reshape(b, l, 3, self.num_heads, d // self.num_heads)  # [B, L, 3, N, H]
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # each [B, L, N, H]
        out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, None, :])  # [B, L, N, H]
        return self.proj(out.reshape(b, l, d))


class EncoderBlock(nnx.Module):
    """Pre-LN transformer encoder block: x + Attn(LN(x), mask), then x + MLP(LN(x)) with a GELU MLP."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: float, *, rngs: nnx.Rngs, dtype: DTypeLike):
        hidden = int(width * mlp_ratio)
        self.norm1 = _layer_norm(width, rngs=rngs)
        self.attn = MaskedSelfAttention(width, num_heads, rngs=rngs, dtype=dtype)
        self.norm2 = _layer_norm(width, rngs=rngs)
        self.fc1 = _linear(width, hidden, rngs=rngs, dtype=dtype)
        self.fc2 = _linear(hidden, width, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """x float32 [B, L, D], mask bool [B, L] -> float32 [B, L, D]."""
        x = x + self.attn(self.norm1(x), mask).astype(jnp.float32)
        h = jax.nn.gelu(self.fc1(self.norm2(x)), approximate=False)  # [B, L, mlp_ratio * D]
        return x + self.fc2(h).astype(jnp.float32)


class TextEncoder(nnx.Module):
    """τ_θ of LDM §3.3: tokens [B, L] and their mask -> (context [B, L, width], pooled [B, width]).

    Args:
        vocab_size: number of token ids (e.g. `data.captions.vocabulary().size`).
        max_len: the longest token sequence accepted (rows of the position table).
        width: model width d_τ, divisible by `num_heads`.
        depth: number of transformer blocks (0: embeddings and the final LayerNorm only).
        num_heads: attention heads per block.
        mlp_ratio: MLP hidden width / `width` (4 as Vaswani et al.).
        dtype: compute dtype of matmuls and attention; parameters stay float32.
        rngs: parameter initialisation.
    """

    def __init__(
        self,
        vocab_size: int,
        max_len: int,
        width: int,
        depth: int,
        num_heads: int,
        *,
        mlp_ratio: float = 4.0,
        dtype: DTypeLike = jnp.float32,
        rngs: nnx.Rngs,
    ):
        for name, value, least in (("vocab_size", vocab_size, 1), ("max_len", max_len, 1), ("width", width, 1),
                                   ("depth", depth, 0), ("num_heads", num_heads, 1)):  # fmt: skip
            if not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        if width % num_heads:
            raise ValueError(f"width={width} must be divisible by num_heads={num_heads}")
        if mlp_ratio <= 0 or int(width * mlp_ratio) < 1:
            raise ValueError(f"mlp_ratio must give a positive MLP width, got {mlp_ratio!r}")
        self.vocab_size = vocab_size
        self.max_len = max_len
        self.width = width
        self.token_embed = nnx.Embed(
            vocab_size, width, embedding_init=embedding_init, param_dtype=jnp.float32, rngs=rngs
        )
        self.pos_embed = nnx.Param(embedding_init(rngs.params(), (max_len, width), jnp.float32))  # [max_len, D]
        self.blocks = nnx.List(
            [EncoderBlock(width, num_heads, mlp_ratio, rngs=rngs, dtype=dtype) for _ in range(depth)]
        )
        self.norm = _layer_norm(width, rngs=rngs)

    def __call__(self, tokens: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        """tokens int [B, L] and mask bool [B, L] (True = real token), L <= max_len.

        Returns:
            context float32 [B, L, width], zero at padded positions, and pooled float32
            [B, width], the mean of `context` over each row's real tokens (zeros for a row
            without any).
        """
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens: expected integer ids [B, L], got {tokens.dtype} {tokens.shape}")
        if tokens.shape[1] > self.max_len:
            raise ValueError(f"tokens: length {tokens.shape[1]} exceeds max_len={self.max_len}")
        if mask.shape != tokens.shape:
            raise ValueError(f"mask: expected shape {tokens.shape} like tokens, got {mask.shape}")
        mask = mask.astype(bool)
        x = self.token_embed(tokens) + self.pos_embed[None, : tokens.shape[1]]  # [B, L, D] float32
        for block in self.blocks:
            x = block(x, mask)
        keep = mask[..., None].astype(jnp.float32)  # [B, L, 1]
        context = self.norm(x) * keep  # [B, L, D]
        pooled = context.sum(axis=1) / jnp.maximum(keep.sum(axis=1), 1.0)  # [B, D]
        return context, pooled


def build_text_encoder(
    options: dict, context_dim: int | None, *, rngs: nnx.Rngs, dtype: DTypeLike = jnp.float32
) -> TextEncoder:
    """The jointly trained text encoder of a denoiser's `model.text_encoder` (vocab_size, max_len, width,
    depth, num_heads); its width is the denoiser's `context_dim` (a different `context_dim` is a ConfigError)."""
    required = ("vocab_size", "max_len", "width", "depth", "num_heads")
    missing = [k for k in required if options.get(k) is None]
    if missing:
        raise ConfigError(f"model.text_encoder: missing {missing}; it needs {list(required)}")
    if context_dim is not None and context_dim != options["width"]:
        raise ConfigError(f"model.context_dim: {context_dim} != model.text_encoder.width {options['width']}")
    return TextEncoder(**{k: options[k] for k in required}, rngs=rngs, dtype=dtype)


Context = tuple[jax.Array, jax.Array] | None  # (context [B, L, D], context_mask [B, L]) for cross-attention


def split_condition(
    cond: conditioning.Cond, text_encoder: TextEncoder | None
) -> tuple[dict[str, jax.Array], Context]:
    """A denoiser's condition split into what its embedding takes (label, pooled) and its cross-attention context.

    With a text encoder, `tokens`/`token_mask` are encoded here (trained jointly with the denoiser,
    LDM §3.3): the context [B, L, width] goes to the cross-attention and the pooled output to the
    embedding. Otherwise a given `context`/`context_mask` (e.g. saved CLIP/T5 outputs) is used as is.
    """
    entries = conditioning.with_masks(conditioning.as_dict(cond))
    if "tokens" in entries:
        if text_encoder is None:
            raise ValueError("cond: tokens were given to a model built without model.text_encoder")
        context, pooled = text_encoder(entries.pop("tokens"), entries["token_mask"])
        entries.update(context=context, context_mask=entries.pop("token_mask"), pooled=pooled)
    context = (entries.pop("context"), entries.pop("context_mask")) if "context" in entries else None
    return entries, context
