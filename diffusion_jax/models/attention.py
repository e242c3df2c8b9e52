"""Self- and cross-attention and LDM's SpatialTransformer, in Flax NNX, NHWC.

Latent diffusion conditions the U-Net on a token sequence τ(y) [B, L, D_ctx] (text, layout, ...)
through cross-attention (Rombach et al. 2022, arXiv 2112.10752, §3.3, eq. (3)):

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d)) V,
    Q = W_Q · φ(z),  K = W_K · τ(y),  V = W_V · τ(y),

with φ(z) the flattened intermediate U-Net features; multi-head, scaled dot-product attention
as Vaswani et al. 2017 (arXiv 1706.03762, §3.2). The block that carries it is LDM's
`SpatialTransformer` (diffusers' `Transformer2DModel`): GroupNorm -> proj_in -> `depth`
transformer blocks (self-attention, cross-attention, GEGLU feed-forward (Shazeer 2020,
arXiv 2002.05202, eq. (5) 'GEGLU'), each pre-LayerNorm and residual) -> zero-initialised
proj_out, added to the input.

Parameter paths read like diffusers' keys, so that a rule table in `convert/` maps PyTorch
weights one to one: `norm`, `proj_in`, `transformer_blocks.{i}.{norm1,attn1,norm2,attn2,norm3}`,
`attn{1,2}.to_{q,k,v}.kernel` (no bias), `attn{1,2}.to_out.0.{kernel,bias}`,
`ff.net.0.proj.{kernel,bias}`, `ff.net.2.{kernel,bias}`, `proj_out`. (`nnx.List` gives the
`.0`/`.2` indices; diffusers' dropout slots `to_out.1` and `ff.net.1` hold no weights and are
`None` here: these modules have no dropout, as LDM's default dropout=0.) Kernels are stored
[in, out] (1x1 convs [1, 1, in, out]), the transpose of PyTorch's [out, in].

Key padding: `context_mask` [B, L] (True = a real token) removes padded tokens from the
softmax. A query whose every key is masked (a zero-length context, or one whose tokens are all
padding) has no defined softmax; here its attention output, *including the to_out bias*, is
defined as zero. That is what makes an empty context mean "the cross-attention contributes
nothing": it equals `context=None`, which skips the cross-attention, so one code path serves
the conditional model and the null condition of classifier-free guidance alike.

Precision: `dtype` is the compute dtype (e.g. jnp.bfloat16); parameters are float32, and the
residual streams (the block's input x and the token stream) keep the dtype of the input.
"""

import math
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import DTypeLike

from diffusion_jax.errors import ConfigError
from diffusion_jax.models import ring_attention
from diffusion_jax.models.bias import Conv, Linear
from diffusion_jax.models.layers import zeros_init

AttentionImpl = Literal["xla", "cudnn"]

# PyTorch's default nn.Linear / nn.Conv2d weight init, which LDM trains with:
# kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in)). Biases start at zero here.
torch_default_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _linear(
    in_features: int,
    out_features: int,
    *,
    use_bias: bool = True,
    zero: bool = False,
    rngs: nnx.Rngs,
    dtype: DTypeLike,
) -> Linear:
    """A dense layer with float32 parameters computing in `dtype`; `zero` for LDM's zero_module."""
    return Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        kernel_init=zeros_init if zero else torch_default_init,
        bias_init=zeros_init,
        dtype=dtype,
        param_dtype=jnp.float32,
        rngs=rngs,
    )


def _conv1x1(in_ch: int, out_ch: int, *, zero: bool = False, rngs: nnx.Rngs, dtype: DTypeLike) -> Conv:
    """A 1x1 convolution (SD 1.x's proj_in / proj_out), kernel [1, 1, in, out]."""
    return Conv(
        in_ch,
        out_ch,
        (1, 1),
        kernel_init=zeros_init if zero else torch_default_init,
        bias_init=zeros_init,
        dtype=dtype,
        param_dtype=jnp.float32,
        rngs=rngs,
    )


def _layer_norm(dim: int, *, rngs: nnx.Rngs, dtype: DTypeLike) -> nnx.LayerNorm:
    """PyTorch's nn.LayerNorm(dim): eps 1e-5, affine, two-pass variance; statistics in float32."""
    return nnx.LayerNorm(dim, epsilon=1e-5, use_fast_variance=False, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


def check_context(
    context: jax.Array | None,
    context_mask: jax.Array | None,
    *,
    batch: int,
    context_dim: int | None,
) -> None:
    """Raise ValueError naming `context` / `context_mask` unless they fit a model with `context_dim`.

    `context` must be [batch, L, context_dim] (L may be 0) and `context_mask`, when given,
    [batch, L]. A mask without a context, or a context for a model built without
    `context_dim`, is an error. Shapes are static, so this runs at trace time.
    """
    if context is None:
        if context_mask is not None:
            raise ValueError("context_mask: given without a context; pass the context it masks, or neither")
        return
    if context_dim is None:
        raise ValueError("context: a token context was given to a model built without model.context_dim")
    if context.ndim != 3:
        raise ValueError(f"context: expected [B, L, {context_dim}], got shape {tuple(context.shape)}")
    if context.shape[0] != batch:
        raise ValueError(f"context: batch {context.shape[0]} != batch {batch} of x")
    if context.shape[-1] != context_dim:
        raise ValueError(f"context: width {context.shape[-1]} != model.context_dim {context_dim}")
    if context_mask is not None and tuple(context_mask.shape) != tuple(context.shape[:2]):
        raise ValueError(
            f"context_mask: expected shape [B, L] = {tuple(context.shape[:2])} to match context, "
            f"got {tuple(context_mask.shape)}"
        )


class Attention(nnx.Module):
    """Multi-head scaled dot-product attention (Vaswani et al. 2017, §3.2; LDM eq. (3)).

    Q = to_q(x), K = to_k(c), V = to_v(c) with c = context (cross-attention) or c = x
    (self-attention, `context=None`); out = to_out.0(concat_heads(softmax(Q K^T / sqrt(d)) V)).
    Head h uses feature columns h*head_dim .. (h+1)*head_dim - 1 of Q, K and V (diffusers'
    head split). Computed by `jax.nn.dot_product_attention`, whose `implementation` picks XLA
    or cuDNN's fused kernel.

    With `context_mask` [B, L] (True = real token), masked keys get no weight, and a batch row
    without any real key returns exactly zero (see the module docstring).
    """

    def __init__(
        self,
        query_dim: int,
        *,
        context_dim: int | None = None,
        num_heads: int,
        head_dim: int,
        attention_impl: AttentionImpl | None = None,
        rngs: nnx.Rngs,
        dtype: DTypeLike = jnp.float32,
    ):
        inner = num_heads * head_dim
        self.query_dim = query_dim
        self.context_dim = query_dim if context_dim is None else context_dim
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.attention_impl = attention_impl
        self.dtype = dtype
        self.to_q = _linear(query_dim, inner, use_bias=False, rngs=rngs, dtype=dtype)
        self.to_k = _linear(self.context_dim, inner, use_bias=False, rngs=rngs, dtype=dtype)
        self.to_v = _linear(self.context_dim, inner, use_bias=False, rngs=rngs, dtype=dtype)
        self.to_out = nnx.List([_linear(inner, query_dim, rngs=rngs, dtype=dtype)])  # diffusers' to_out.0

    def __call__(
        self, x: jax.Array, context: jax.Array | None = None, context_mask: jax.Array | None = None
    ) -> jax.Array:
        """x [B, T, query_dim], context [B, L, context_dim] or None (self), context_mask [B, L] -> [B, T, query_dim].

        The output is in the compute dtype; `context_mask` masks the keys, whichever they are.
        """
        b, t, _ = x.shape
        self_attending = context is None
        if context is None:
            if self.context_dim != self.query_dim:
                raise ValueError(
                    f"context: this cross-attention takes a [B, L, {self.context_dim}] context; "
                    "got None (self-attention needs context_dim == query_dim)"
                )
            context = x
        check_context(context, context_mask, batch=b, context_dim=self.context_dim)
        n, d = self.num_heads, self.head_dim
        l = context.shape[1]
        if l == 0:  # no key at all: the attention adds nothing (static shape, no kernel launched)
            return jnp.zeros((b, t, self.query_dim), self.dtype)
        q = self.to_q(x).reshape(b, t, n, d)  # [B, T, N, d]
        k = self.to_k(context).reshape(b, l, n, d)  # [B, L, N, d]
        v = self.to_v(context).reshape(b, l, n, d)  # [B, L, N, d]
        mask = None
        if context_mask is not None:
            keep = jnp.asarray(context_mask).astype(bool)  # [B, L]
            has_key = jnp.any(keep, axis=-1)  # [B]
            # A row with no real key attends to all keys (finite, no NaN in either pass), then is zeroed below.
            keep = keep | ~has_key[:, None]
            mask = keep[:, None, None, :]  # [B, 1, 1, L], broadcast over heads and queries
            if self.attention_impl == "cudnn":  # cuDNN takes the mask as a bias with the full [T, L] extent
                mask = jnp.broadcast_to(mask, (b, 1, t, l))
        if self_attending and mask is None:  # split over the mesh's 'sequence' axis when it has one
            out = ring_attention.self_attention(q, k, v, implementation=self.attention_impl)  # [B, T, N, d]
        else:
            out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=self.attention_impl)
        out = self.to_out[0](out.reshape(b, t, n * d))  # [B, T, query_dim]
        if context_mask is not None:
            out = jnp.where(has_key[:, None, None], out, jnp.zeros((), out.dtype))
        return out


class GEGLU(nnx.Module):
    """GEGLU(x) = (x W + b) ⊙ GELU(x V + c) (Shazeer 2020, arXiv 2002.05202, eq. (5)).

    One projection `proj` to 2 * dim_out; the first half is the value, the second the gate
    (diffusers' `GEGLU`, exact erf GELU as PyTorch's F.gelu).
    """

    def __init__(self, dim_in: int, dim_out: int, *, rngs: nnx.Rngs, dtype: DTypeLike = jnp.float32):
        self.proj = _linear(dim_in, 2 * dim_out, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """[..., dim_in] -> [..., dim_out]."""
        value, gate = jnp.split(self.proj(x), 2, axis=-1)  # [..., dim_out] each
        return value * jax.nn.gelu(gate, approximate=False)


class FeedForward(nnx.Module):
    """GEGLU(dim -> mult * dim) then Linear(mult * dim -> dim_out): LDM's FeedForward(glu=True).

    Names follow diffusers: `net.0.proj` (the GEGLU projection), `net.1` the dropout slot
    (None: no dropout, no weights), `net.2` the output Linear.
    """

    def __init__(
        self,
        dim: int,
        *,
        dim_out: int | None = None,
        mult: int = 4,
        rngs: nnx.Rngs,
        dtype: DTypeLike = jnp.float32,
    ):
        inner = mult * dim
        self.net = nnx.List(
            [
                GEGLU(dim, inner, rngs=rngs, dtype=dtype),
                None,
                _linear(inner, dim if dim_out is None else dim_out, rngs=rngs, dtype=dtype),
            ]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """[..., dim] -> [..., dim_out]."""
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nnx.Module):
    """LDM's BasicTransformerBlock (arXiv 2112.10752, §3.3 and Appendix; diffusers' names).

    x = x + attn1(norm1(x))                          self-attention over the tokens
    x = x + attn2(norm2(x), context, context_mask)   cross-attention to τ(y), eq. (3)
    x = x + ff(norm3(x))                             GEGLU feed-forward, inner width 4 * dim

    Built without `context_dim` it has no attn2/norm2 (as diffusers with no
    cross_attention_dim). `context=None` skips the cross-attention, which equals an empty or
    all-masked context. The residual stream keeps the dtype of x.
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int,
        head_dim: int,
        context_dim: int | None,
        attention_impl: AttentionImpl | None = None,
        rngs: nnx.Rngs,
        dtype: DTypeLike = jnp.float32,
    ):
        self.context_dim = context_dim
        heads = dict(num_heads=num_heads, head_dim=head_dim, attention_impl=attention_impl, rngs=rngs, dtype=dtype)
        self.norm1 = _layer_norm(dim, rngs=rngs, dtype=dtype)
        self.attn1 = Attention(dim, **heads)
        if context_dim is None:
            self.norm2 = None
            self.attn2 = None
        else:
            self.norm2 = _layer_norm(dim, rngs=rngs, dtype=dtype)
            self.attn2 = Attention(dim, context_dim=context_dim, **heads)
        self.norm3 = _layer_norm(dim, rngs=rngs, dtype=dtype)
        self.ff = FeedForward(dim, rngs=rngs, dtype=dtype)

    def __call__(
        self, x: jax.Array, context: jax.Array | None = None, context_mask: jax.Array | None = None
    ) -> jax.Array:
        """x [B, T, dim], context [B, L, context_dim] or None, context_mask [B, L] or None -> [B, T, dim]."""
        check_context(context, context_mask, batch=x.shape[0], context_dim=self.context_dim)
        x = x + self.attn1(self.norm1(x)).astype(x.dtype)
        if context is not None:
            x = x + self.attn2(self.norm2(x), context, context_mask).astype(x.dtype)
        return x + self.ff(self.norm3(x)).astype(x.dtype)


class SpatialTransformer(nnx.Module):
    """LDM's SpatialTransformer (arXiv 2112.10752, §3.3) == diffusers' Transformer2DModel, NHWC.

    out = x + proj_out(blocks(proj_in(GroupNorm(x)) as H*W tokens)), where proj_in / proj_out
    are 1x1 convolutions (SD 1.x) or Linear layers (`use_linear_projection`, SD 2.x) between
    `channels` and inner = num_heads * head_dim, and proj_out is zero-initialised (LDM's
    zero_module) so a fresh block is the identity.

    Args:
        channels: C of the feature map.
        num_heads: attention heads (SD 1.x: 8).
        head_dim: width of a head; None -> channels // num_heads.
        depth: number of BasicTransformerBlocks.
        context_dim: width D_ctx of the token context (SD 1.x: 768); None builds blocks
            without cross-attention, which then reject a context.
        use_linear_projection: proj_in / proj_out as Linear ([C, inner] kernels) instead of
            1x1 convs ([1, 1, C, inner]); numerically the same map.
        attention_impl: `implementation` of `jax.nn.dot_product_attention`: None (JAX's choice,
            XLA in jax 0.10), 'xla', or 'cudnn' (NVIDIA GPUs; bfloat16/float16, head_dim <= 128).
        dtype: compute dtype; parameters are float32.
        rngs: parameter initialisation keys.

    Raises:
        ConfigError (a ValueError): `num_heads` does not divide `channels` (with head_dim=None),
            or `attention_impl` is unknown.
    """

    def __init__(
        self,
        channels: int,
        *,
        num_heads: int,
        head_dim: int | None = None,
        depth: int = 1,
        context_dim: int | None = None,
        use_linear_projection: bool = False,
        attention_impl: AttentionImpl | None = None,
        rngs: nnx.Rngs,
        dtype: DTypeLike = jnp.float32,
    ):
        if num_heads < 1 or (head_dim is None and channels % num_heads):
            divisors = ", ".join(str(k) for k in range(1, channels + 1) if channels % k == 0)
            raise ConfigError(
                f"model.num_heads: {num_heads} does not divide the {channels} channels of a SpatialTransformer; "
                f"use one of {divisors} or set head_dim"
            )
        if head_dim is not None and head_dim < 1:
            raise ConfigError(f"model.head_dim: got {head_dim}; use a positive width or None (channels // num_heads)")
        if attention_impl not in (None, "xla", "cudnn"):
            raise ConfigError(f"model.attention_impl: got {attention_impl!r}; choose None, 'xla' or 'cudnn'")
        head_dim = channels // num_heads if head_dim is None else head_dim
        inner = num_heads * head_dim
        self.channels = channels
        self.context_dim = context_dim
        self.norm = nnx.GroupNorm(
            channels,
            num_groups=math.gcd(32, channels),
            epsilon=1e-6,
            use_fast_variance=False,
            dtype=dtype,
            param_dtype=jnp.float32,
            rngs=rngs,
        )
        proj = _linear if use_linear_projection else _conv1x1
        self.proj_in = proj(channels, inner, rngs=rngs, dtype=dtype)
        self.transformer_blocks = nnx.List(
            [
                BasicTransformerBlock(
                    inner,
                    num_heads=num_heads,
                    head_dim=head_dim,
                    context_dim=context_dim,
                    attention_impl=attention_impl,
                    rngs=rngs,
                    dtype=dtype,
                )
                for _ in range(depth)
            ]
        )
        self.proj_out = proj(inner, channels, zero=True, rngs=rngs, dtype=dtype)

    def __call__(
        self, x: jax.Array, context: jax.Array | None = None, context_mask: jax.Array | None = None
    ) -> jax.Array:
        """x [B, H, W, C], context [B, L, D_ctx] or None, context_mask [B, L] bool or None -> [B, H, W, C].

        `context=None` (like an L=0 or all-masked context) means the cross-attention adds nothing.
        """
        if x.ndim != 4 or x.shape[-1] != self.channels:
            raise ValueError(f"x: SpatialTransformer expects [B, H, W, {self.channels}], got {tuple(x.shape)}")
        b, h, w, _ = x.shape
        check_context(context, context_mask, batch=b, context_dim=self.context_dim)
        tokens = self.proj_in(self.norm(x)).astype(x.dtype)  # [B, H, W, inner]
        tokens = tokens.reshape(b, h * w, -1)  # [B, H*W, inner]
        for block in self.transformer_blocks:
            tokens = block(tokens, context, context_mask)
        out = self.proj_out(tokens.reshape(b, h, w, -1))  # [B, H, W, C]
        return x + out.astype(x.dtype)
