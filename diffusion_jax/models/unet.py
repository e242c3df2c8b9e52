"""The DDPM / ADM U-Net in Flax NNX, NHWC.

Ho et al. 2020 (arXiv 2006.11239, Appendix B; diffusion_tf/models/unet.py) with
the options of ADM (Dhariwal & Nichol 2021, arXiv 2105.05233, §3): multi-head
attention, scale-shift norm (AdaGN) and up/downsampling inside residual blocks.
With Ho's CIFAR-10 settings it has Ho's 35,746,307 parameters.
"""

from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import DTypeLike

from diffusion_jax import conditioning, repa
from diffusion_jax.errors import ConfigError
from diffusion_jax.models import ring_attention
from diffusion_jax.models.attention import SpatialTransformer
from diffusion_jax.models.bias import Conv
from diffusion_jax.models.layers import (
    ConditionEmbedder,
    default_init,
    group_norm,
    linear,
    zeros_init,
)
from diffusion_jax.models.text import Context, build_text_encoder, split_condition

Direction = Literal["down", "up"]


def _conv3x3(
    in_ch: int,
    out_ch: int,
    *,
    stride: int = 1,
    padding: str | int = "SAME",
    zero_init: bool = False,
    rngs: nnx.Rngs,
    dtype: DTypeLike,
) -> Conv:
    """3x3 convolution (SAME, or `padding` zeros on every side) with Ho et al.'s initialisation (zero for
    output convs)."""
    return Conv(
        in_ch,
        out_ch,
        (3, 3),
        strides=stride,
        padding=padding,
        kernel_init=zeros_init if zero_init else default_init,
        dtype=dtype,
        rngs=rngs,
    )


def _upsample_nearest(x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, 2H, 2W, C], nearest neighbour."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _avg_pool(x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, H/2, W/2, C], 2x2 mean (ADM's Downsample without conv)."""
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


class ResBlock(nnx.Module):
    """Residual block with a timestep-embedding input (Ho et al. `resnet_block`; ADM `ResBlock`).

    h = conv1(SiLU(GN(x))); then either h = GN(h + Linear(SiLU(emb))) (DDPM) or
    h = GN(h) * (1 + scale) + shift with (scale, shift) = Linear(SiLU(emb)) (ADM's
    AdaGN); out = skip(x) + conv2(Dropout(SiLU(h))) with conv2 zero-initialised and
    skip a 1x1 projection when the width changes. With `resample`, ADM resamples h
    and x after the first norm: 2x2 average pool ('down') or nearest x2 ('up').
    Both GNs use epsilon `norm_eps` (diffusers' ResnetBlock2D `eps`).
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        *,
        emb_dim: int,
        dropout: float,
        use_scale_shift_norm: bool,
        resample: Direction | None = None,
        norm_eps: float = 1e-6,
        rngs: nnx.Rngs,
        dtype: DTypeLike = jnp.float32,
    ):
        self.use_scale_shift_norm = use_scale_shift_norm
        self.resample = resample
        self.norm1 = group_norm(in_ch, eps=norm_eps, rngs=rngs, dtype=dtype)
        self.conv1 = _conv3x3(in_ch, out_ch, rngs=rngs, dtype=dtype)
        emb_out = 2 * out_ch if use_scale_shift_norm else out_ch
        self.emb_proj = linear(emb_dim, emb_out, rngs=rngs, dtype=dtype)
        self.norm2 = group_norm(out_ch, eps=norm_eps, rngs=rngs, dtype=dtype)
        self.dropout = nnx.Dropout(dropout)
        self.conv2 = _conv3x3(out_ch, out_ch, zero_init=True, rngs=rngs, dtype=dtype)
        self.skip = linear(in_ch, out_ch, rngs=rngs, dtype=dtype) if in_ch != out_ch else None

    def __call__(self, x: jax.Array, emb: jax.Array, train: bool = False, rngs: nnx.Rngs | None = None) -> jax.Array:
        """x: [B, H, W, in_ch], emb: [B, emb_dim] -> [B, H', W', out_ch]."""
        h = self.norm1(x, silu=True)
        if self.resample == "down":
            h, x = _avg_pool(h), _avg_pool(x)
        elif self.resample == "up":
            h, x = _upsample_nearest(h), _upsample_nearest(x)
        h = self.conv1(h)  # [B, H', W', out_ch]
        e = self.emb_proj(nnx.silu(emb))  # [B, emb_out]
        if self.use_scale_shift_norm:
            scale, shift = jnp.split(e, 2, axis=-1)
            h = self.norm2(h, scale=scale, shift=shift, silu=True)
        else:
            h = self.norm2(h + e[:, None, None, :], silu=True)
        h = self.dropout(h, deterministic=not train, rngs=rngs)
        h = self.conv2(h)
        if self.skip is not None:
            x = self.skip(x)
        return x + h


class AttentionBlock(nnx.Module):
    """Self-attention over the H*W positions, residual (Ho `attn_block`; ADM `AttentionBlock`).

    GN -> qkv projection -> `jax.nn.dot_product_attention` (ring attention when `mesh.sequence` splits
    the positions, `ring_attention.self_attention`) -> zero-initialised output projection, added to the input.
    """

    def __init__(self, channels: int, *, num_heads: int, rngs: nnx.Rngs, dtype: DTypeLike = jnp.float32):
        self.num_heads = num_heads
        self.norm = group_norm(channels, rngs=rngs, dtype=dtype)
        self.qkv = linear(channels, 3 * channels, rngs=rngs, dtype=dtype)
        self.proj_out = linear(channels, channels, zero_init=True, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, H, W, C] -> [B, H, W, C]."""
        b, h, w, c = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, h * w, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # each [B, T, N, C/N]
        out = ring_attention.self_attention(q, k, v)  # [B, T, N, C/N]
        return x + self.proj_out(out.reshape(b, h, w, c))


def _attend(attn: AttentionBlock | SpatialTransformer, h: jax.Array, context: Context) -> jax.Array:
    """Self-attention, or LDM's SpatialTransformer with cross-attention to `context` (None: nothing to attend)."""
    if isinstance(attn, SpatialTransformer):
        return attn(h, *(context or (None, None)))
    return attn(h)


class Stage(nnx.Module):
    """One entry of the down or up path: a ResBlock, then attention at the chosen resolutions
    (with `model.context_dim`, LDM's SpatialTransformer: self- and cross-attention)."""

    def __init__(self, res: ResBlock, attn: AttentionBlock | SpatialTransformer | None, remat: bool = False):
        self.res = res
        self.attn = attn
        self.remat = remat

    def __call__(
        self, x: jax.Array, emb: jax.Array, train: bool, rngs: nnx.Rngs | None, context: Context = None
    ) -> jax.Array:
        """[B, H, W, in_ch] -> [B, H, W, out_ch]; with `remat`, recomputed in the backward pass."""
        if self.remat:
            return nnx.remat(_apply_stage, static_argnums=(3,))(self, x, emb, train, rngs, context)
        return _apply_stage(self, x, emb, train, rngs, context)


def _apply_stage(
    stage: Stage, x: jax.Array, emb: jax.Array, train: bool, rngs: nnx.Rngs | None, context: Context
) -> jax.Array:
    """The stage's computation as a function of the stage, the form `nnx.remat` transforms."""
    h = stage.res(x, emb, train, rngs)
    return h if stage.attn is None else _attend(stage.attn, h, context)


class Resample(nnx.Module):
    """x2 down- or upsampling between levels.

    DDPM: a 3x3 conv with stride 2 ('down'), or nearest x2 then a 3x3 conv ('up').
    ADM with `resblock_updown`: a ResBlock that resamples internally. The stride-2 conv pads
    SAME (our even sizes: 0 before, 1 after, as Ho et al.'s TF code and diffusers' `downsample_padding=0`),
    or `downsample_padding` zeros on every side (LDM's and Stable Diffusion's Downsample: 1).
    """

    def __init__(
        self,
        channels: int,
        direction: Direction,
        *,
        resblock: bool,
        emb_dim: int,
        dropout: float,
        use_scale_shift_norm: bool,
        norm_eps: float = 1e-6,
        downsample_padding: int | None = None,
        rngs: nnx.Rngs,
        dtype: DTypeLike = jnp.float32,
    ):
        self.direction = direction
        if resblock:
            self.block = ResBlock(
                channels,
                channels,
                emb_dim=emb_dim,
                dropout=dropout,
                use_scale_shift_norm=use_scale_shift_norm,
                resample=direction,
                norm_eps=norm_eps,
                rngs=rngs,
                dtype=dtype,
            )
            self.conv = None
        else:
            self.block = None
            down = direction == "down"
            padding = "SAME" if downsample_padding is None or not down else downsample_padding
            self.conv = _conv3x3(channels, channels, stride=2 if down else 1, padding=padding, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, emb: jax.Array, train: bool, rngs: nnx.Rngs | None) -> jax.Array:
        """[B, H, W, C] -> [B, H/2, W/2, C] ('down') or [B, 2H, 2W, C] ('up')."""
        if self.block is not None:
            return self.block(x, emb, train, rngs)
        if self.direction == "up":
            x = _upsample_nearest(x)
        return self.conv(x)


class Level(nnx.Module):
    """The stages at one resolution and the resampling that leaves it (None at the end)."""

    def __init__(self, stages: list[Stage], resample: Resample | None):
        self.stages = nnx.List(stages)
        self.resample = resample


def _fmt(values: Sequence[int]) -> str:
    return "(" + ",".join(str(v) for v in values) + ")"


class Blocks:
    """The checked U-Net hyperparameters and factories for its blocks.

    Used at construction only (it is not a module and holds no parameters), by the
    U-Net and by the encoder-only classifier (`models.classifier.EncoderUNet`), so the
    two build the same down path and middle block from the same arguments.

    Raises:
        ConfigError: when `image_size` cannot be halved len(ch_mult) - 1 times, an
            attention resolution is never visited, heads do not divide the channels, or
            `downsample_padding` is neither None nor 1 (or set where ResBlocks resample).
    """

    def __init__(
        self,
        image_size: int,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        dropout: float,
        num_heads: int,
        num_head_channels: int | None,
        use_scale_shift_norm: bool,
        resblock_updown: bool,
        *,
        rngs: nnx.Rngs,
        dtype: DTypeLike,
        remat: bool = False,
        context_dim: int | None = None,
        transformer_depth: int = 1,
        norm_eps: float = 1e-6,
        downsample_padding: int | None = None,
    ):
        if downsample_padding not in (None, 1):  # a stride-2 3x3 conv halves an even size only so
            raise ConfigError(f"model.downsample_padding: got {downsample_padding!r}; use None (SAME: 0 before, "
                              "1 after) or 1 (1 on every side, as Stable Diffusion)")
        if downsample_padding is not None and resblock_updown:
            raise ConfigError("model.downsample_padding: pads the conv downsampling, but model.resblock_updown=True "
                              "downsamples in ResBlocks; leave it None")
        ch_mult = tuple(ch_mult)
        attn_resolutions = tuple(attn_resolutions)
        if not ch_mult:
            raise ConfigError("model.ch_mult: needs at least one level, e.g. (1, 2, 2, 2)")
        factor = 2 ** (len(ch_mult) - 1)
        if image_size % factor:
            raise ConfigError(
                f"data.image_size: {image_size} cannot be halved {len(ch_mult) - 1} times by "
                f"model.ch_mult={_fmt(ch_mult)}; use a multiple of {factor}"
            )
        resolutions = [image_size // 2**i for i in range(len(ch_mult))]
        unvisited = [r for r in attn_resolutions if r not in resolutions]
        if unvisited:
            raise ConfigError(
                f"model.attn_resolutions: {_fmt(unvisited)} never visited; with "
                f"data.image_size={image_size} and model.ch_mult={_fmt(ch_mult)} the U-Net "
                f"visits {', '.join(map(str, resolutions))}"
            )
        attn_channels = {ch * m for m, r in zip(ch_mult, resolutions, strict=True) if r in attn_resolutions}
        attn_channels.add(ch * ch_mult[-1])  # the middle block always attends
        for c in sorted(attn_channels):
            if num_head_channels is not None and c % num_head_channels:
                raise ConfigError(
                    f"model.num_head_channels: {num_head_channels} does not divide the {c} "
                    f"channels of an attention block; use a divisor of {c}"
                )
            if num_head_channels is None and c % num_heads:
                raise ConfigError(
                    f"model.num_heads: {num_heads} does not divide the {c} channels of an "
                    f"attention block; use a divisor of {c}"
                )
        self.image_size = image_size
        self.ch = ch
        self.ch_mult = ch_mult
        self.num_res_blocks = num_res_blocks
        self.attn_resolutions = attn_resolutions
        self.resolutions = resolutions
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.resblock_updown = resblock_updown
        self.emb_dim = 4 * ch
        self.rngs = rngs
        self.dtype = dtype
        self.remat = remat
        self.context_dim = context_dim
        self.transformer_depth = transformer_depth
        self.downsample_padding = downsample_padding
        self.res_kw = dict(
            emb_dim=self.emb_dim, dropout=dropout, use_scale_shift_norm=use_scale_shift_norm, norm_eps=norm_eps,
            rngs=rngs, dtype=dtype,
        )

    def res_block(self, cin: int, cout: int) -> ResBlock:
        return ResBlock(cin, cout, **self.res_kw)

    def attention(self, channels: int) -> AttentionBlock | SpatialTransformer:
        """Self-attention; with `context_dim`, LDM's SpatialTransformer (self- and cross-attention,
        GEGLU feed-forward, `transformer_depth` blocks) in its place, as LDM's U-Net does."""
        heads = self.num_heads if self.num_head_channels is None else channels // self.num_head_channels
        if self.context_dim is not None:
            return SpatialTransformer(
                channels, num_heads=heads, depth=self.transformer_depth, context_dim=self.context_dim,
                rngs=self.rngs, dtype=self.dtype,
            )
        return AttentionBlock(channels, num_heads=heads, rngs=self.rngs, dtype=self.dtype)

    def stage(self, cin: int, cout: int, res: int) -> Stage:
        """A ResBlock cin -> cout, then attention if `res` is in `attn_resolutions`."""
        attn = self.attention(cout) if res in self.attn_resolutions else None
        return Stage(self.res_block(cin, cout), attn, self.remat)

    def resample(self, channels: int, direction: Direction) -> Resample:
        return Resample(channels, direction, resblock=self.resblock_updown,
                        downsample_padding=self.downsample_padding, **self.res_kw)


class Encoder(nnx.Module):
    """The U-Net's first half: condition embedding, conv_in, the down path and the middle block.

    A base class: `UNet` adds the up path and `models.classifier.EncoderUNet` a pooled
    head. Both keep the same attribute names (`cond`, `conv_in`, `down`, `mid_*`), so the
    parameter paths and the initialisation order are those of the original U-Net.
    """

    def _build_encoder(
        self,
        blocks: Blocks,
        in_channels: int,
        num_classes: int | None,
        pooled_dim: int | None = None,
        text_encoder: dict | None = None,
        time_freq_shift: float = 0.0,
        low_res_size: int | None = None,
        interval_embedding: bool = False,
        repa_layer: int | None = None,
        repa_dim: int | None = None,
    ) -> list[int]:
        """Builds the encoder; returns the widths of the activations a decoder concatenates."""
        ch, rngs, dtype = blocks.ch, blocks.rngs, blocks.dtype
        if repa_dim is not None:
            repa.check_layer(repa_layer, len(blocks.ch_mult) + 1, "the down levels' outputs, then the middle block")
        self.repa_layer = repa_layer if repa_dim is not None else None
        widths = [ch * mult for mult in blocks.ch_mult] + [ch * blocks.ch_mult[-1]]  # at each tap
        self.repa_projector = (None if self.repa_layer is None
                               else repa.Projector(widths[repa_layer - 1], repa_dim, rngs=rngs, dtype=dtype))
        if low_res_size is not None and not (0 < low_res_size < blocks.image_size
                                             and blocks.image_size % low_res_size == 0):
            raise ConfigError(f"model.low_res_size: got {low_res_size}; a super-resolution model's input must be "
                              f"smaller than data.image_size={blocks.image_size} and divide it")
        self.image_size = blocks.image_size
        self.in_channels = in_channels
        self.low_res_size = low_res_size
        self.text_encoder = (
            None if text_encoder is None
            else build_text_encoder(text_encoder, blocks.context_dim, rngs=rngs, dtype=dtype)
        )
        if self.text_encoder is not None:
            pooled_dim = self.text_encoder.width  # its pooled output joins the time embedding
        self.cond = ConditionEmbedder(ch, blocks.emb_dim, num_classes, pooled_dim=pooled_dim,
                                      freq_shift=time_freq_shift, low_res_noise=low_res_size is not None,
                                      interval=interval_embedding, rngs=rngs, dtype=dtype)
        low_res_channels = 0 if low_res_size is None else in_channels  # SR3: [x_t, upsampled low-res image]
        self.conv_in = _conv3x3(in_channels + low_res_channels, ch, rngs=rngs, dtype=dtype)

        skip_chans = [ch]  # widths of the activations the up path will concatenate
        cur = ch
        down = []
        for i, (mult, res) in enumerate(zip(blocks.ch_mult, blocks.resolutions, strict=True)):
            stages = []
            for _ in range(blocks.num_res_blocks):
                stages.append(blocks.stage(cur, ch * mult, res))
                cur = ch * mult
                skip_chans.append(cur)
            last = i == len(blocks.ch_mult) - 1
            down.append(Level(stages, None if last else blocks.resample(cur, "down")))
            if not last:
                skip_chans.append(cur)
        self.down = nnx.List(down)

        self.mid_block1 = blocks.res_block(cur, cur)
        self.mid_attn = blocks.attention(cur)
        self.mid_block2 = blocks.res_block(cur, cur)
        return skip_chans

    def _encode(
        self, x: jax.Array, t: jax.Array, cond: conditioning.Cond, train: bool, rngs: nnx.Rngs | None
    ) -> tuple[jax.Array, list[jax.Array], jax.Array, Context]:
        """x [B, H, W, C] -> (middle output [B, H/2^(L-1), W/2^(L-1), ch*ch_mult[-1]],
        the skip activations, the embedding [B, 4ch], the cross-attention context)."""
        expected = (self.image_size, self.image_size, self.in_channels)
        if x.shape[1:] != expected:
            raise ValueError(f"x: {type(self).__name__} expects [B, {', '.join(map(str, expected))}], got {x.shape}")
        cond, context = split_condition(cond, self.text_encoder)
        emb = self.cond(t, cond)  # [B, 4ch]
        if self.low_res_size is not None:
            x = jnp.concatenate([x, self._upsampled_low_res(cond.get("low_res"), x)], axis=-1)  # [B, H, W, 2C]
        h = self.conv_in(x)  # [B, H, W, ch]
        hs = [h]
        for tap, level in enumerate(self.down, start=1):
            for stage in level.stages:
                h = stage(h, emb, train, rngs, context)
                hs.append(h)
            self._sow_repa(h, tap, train)
            if level.resample is not None:
                h = level.resample(h, emb, train, rngs)
                hs.append(h)
        h = self.mid_block1(h, emb, train, rngs)
        h = _attend(self.mid_attn, h, context)
        h = self.mid_block2(h, emb, train, rngs)
        self._sow_repa(h, len(self.down) + 1, train)
        return h, hs, emb, context

    def _sow_repa(self, h: jax.Array, tap: int, train: bool) -> None:
        """While training, sows REPA's projection of the activations h [B, h, w, C] at `model.repa_layer`."""
        if train and tap == self.repa_layer:
            self.sow(nnx.Intermediate, "repa", self.repa_projector(h))

    def _upsampled_low_res(self, low_res: jax.Array | None, x: jax.Array) -> jax.Array:
        """SR3's conditioning input (Saharia et al. 2021, arXiv 2104.07636, §2.4): the low-resolution image
        low_res [B, s, s, C] (None: the null condition, zeros) upsampled bicubically, as SR3 does, to x's
        [B, H, W, C] (`jax.image.resize`, Keys' cubic a = -0.5), for concatenation with x_t."""
        b, h, w, c = x.shape
        expected = (b, self.low_res_size, self.low_res_size, c)
        if low_res is None:
            low_res = jnp.zeros(expected, x.dtype)
        if low_res.shape != expected:
            raise ValueError(f"cond['low_res']: model.low_res_size={self.low_res_size} expects {list(expected)}, "
                             f"got {list(low_res.shape)}")
        return jax.image.resize(low_res.astype(x.dtype), (b, h, w, c), method="bicubic")


class UNet(Encoder):
    """The DDPM / ADM U-Net denoiser for NHWC images.

    conv_in -> per level: `num_res_blocks` ResBlocks (+attention at
    `attn_resolutions`), then downsampling except after the last level -> middle
    ResBlock, attention, ResBlock -> per level in reverse: `num_res_blocks + 1`
    ResBlocks on [h, skip] concatenations (+attention), then upsampling except
    after the first level -> GN -> SiLU -> zero-initialised conv_out
    (Ho et al. 2020, Appendix B; Dhariwal & Nichol 2021).

    Args:
        image_size: height = width of the input.
        in_channels: channels of the input.
        out_channels: channels of the prediction (None: in_channels; VDM's Fourier-feature inputs have more).
        time_freq_shift: the timestep embedding's frequency shift (`layers.timestep_embedding`): 0, or 1 for
            Ho et al.'s own weights (google/ddpm-cifar10-32 imported by `diffusion_jax.convert`).
        ch: base width; level i has ch * ch_mult[i] channels, the time embedding 4 * ch.
        ch_mult: width multipliers, one per resolution level.
        num_res_blocks: ResBlocks per level on the down path (one more on the up path).
        attn_resolutions: spatial sizes (in pixels) at which attention follows each ResBlock.
        dropout: dropout rate inside the ResBlocks.
        num_heads: attention heads, used when `num_head_channels` is None.
        num_head_channels: channels per head (ADM); overrides `num_heads`.
        use_scale_shift_norm: ADM's AdaGN conditioning instead of adding the embedding.
        resblock_updown: resample with ResBlocks (ADM) instead of convolutions (DDPM).
        num_classes: enables class conditioning with a null label (index num_classes).
        learn_sigma: also output the variance interpolation v of improved DDPM
            (Nichol & Dhariwal 2021), doubling the output channels.
        rngs: parameter initialisation keys; the model keeps no RNG state.
        dtype: computation dtype; parameters stay float32.
        remat: recompute each stage's activations (ResBlock + attention) in the backward pass
            (`nnx.remat`): activation memory of one stage per level, at about one more forward.
        context_dim: the width D of a token context [B, L, D] (`cond['context']`): every attention
            block (at `attn_resolutions` and in the middle) becomes LDM's SpatialTransformer
            (Rombach et al. 2022, §3.3: self-attention, cross-attention to the context, GEGLU).
        transformer_depth: transformer blocks per SpatialTransformer (LDM's `transformer_depth`).
        norm_eps: the epsilon of the ResBlocks' and the output's GroupNorms: 1e-6 (Ho et al.'s TF code), or
            Stable Diffusion's 1e-5 (PyTorch's default; diffusers' `norm_eps`). The SpatialTransformers keep
            their own (GroupNorm 1e-6, LayerNorm 1e-5, as LDM and diffusers).
        downsample_padding: the stride-2 downsampling conv's padding: None pads SAME (0 before, 1 after:
            Ho et al., diffusers' `downsample_padding=0`), 1 pads 1 on every side (LDM's Downsample, Stable
            Diffusion's `downsample_padding=1`); the two see the input shifted by one pixel.
        pooled_dim: the width of a pooled embedding `cond['pooled']` [B, D], projected and added
            to the time embedding.
        text_encoder: a jointly trained `models.text.TextEncoder` of `cond['tokens']`: a dict of
            its `vocab_size`, `max_len`, `width`, `depth`, `num_heads`; its context feeds the
            cross-attention (context_dim = width) and its pooled output the time embedding.
        low_res_size: a super-resolution model (SR3, Saharia et al. 2021): `cond['low_res']` [B, s, s, C],
            s = low_res_size, upsampled bicubically to image_size is concatenated to x before conv_in
            (which takes 2C channels), and `cond['low_res_noise']` [B], its augmentation level (CDM), joins the
            time embedding (`layers.ConditionEmbedder`). None: off.
        interval_embedding: a MeanFlow network u(z, r, t) (Geng et al. 2025): `cond['interval']` [B], h = t - r,
            joins the time embedding (`layers.ConditionEmbedder`); `training.objective='meanflow'` sets it.
        repa_layer: REPA's tap (`diffusion_jax.repa`): k <= len(ch_mult) the output of down level k (before its
            downsampling), len(ch_mult) + 1 the middle block; with `repa_dim` (the encoder's width, set from
            `repa.encoder`) a projector to it is built and, while training, sown as `nnx.Intermediate('repa')`.

    Raises:
        ConfigError: when `image_size` cannot be halved len(ch_mult) - 1 times, an
            attention resolution is never visited, heads do not divide the channels, or
            `downsample_padding` is neither None nor 1 (or set with `resblock_updown`).
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.1,
        num_heads: int = 1,
        num_head_channels: int | None = None,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        num_classes: int | None = None,
        learn_sigma: bool = False,
        *,
        rngs: nnx.Rngs,
        dtype: DTypeLike = jnp.float32,
        remat: bool = False,
        context_dim: int | None = None,
        transformer_depth: int = 1,
        pooled_dim: int | None = None,
        text_encoder: dict | None = None,
        out_channels: int | None = None,
        time_freq_shift: float = 0.0,
        norm_eps: float = 1e-6,
        downsample_padding: int | None = None,
        low_res_size: int | None = None,
        interval_embedding: bool = False,
        repa_layer: int | None = None,
        repa_dim: int | None = None,
    ):
        if text_encoder is not None:
            context_dim = context_dim or text_encoder.get("width")
        blocks = Blocks(
            image_size, ch, ch_mult, num_res_blocks, attn_resolutions, dropout, num_heads, num_head_channels,
            use_scale_shift_norm, resblock_updown, rngs=rngs, dtype=dtype, remat=remat, context_dim=context_dim,
            transformer_depth=transformer_depth, norm_eps=norm_eps, downsample_padding=downsample_padding,
        )
        skip_chans = self._build_encoder(blocks, in_channels, num_classes, pooled_dim, text_encoder, time_freq_shift,
                                         low_res_size, interval_embedding, repa_layer, repa_dim)

        cur = ch * blocks.ch_mult[-1]
        up = []
        for i in reversed(range(len(blocks.ch_mult))):
            stages = []
            for _ in range(num_res_blocks + 1):
                stages.append(blocks.stage(cur + skip_chans.pop(), ch * blocks.ch_mult[i], blocks.resolutions[i]))
                cur = ch * blocks.ch_mult[i]
            up.append(Level(stages, None if i == 0 else blocks.resample(cur, "up")))
        self.up = nnx.List(up)

        self.norm_out = group_norm(cur, eps=norm_eps, rngs=rngs, dtype=dtype)
        out_channels = in_channels if out_channels is None else out_channels
        out_channels = 2 * out_channels if learn_sigma else out_channels
        self.conv_out = _conv3x3(cur, out_channels, zero_init=True, rngs=rngs, dtype=dtype)

    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        cond: jax.Array | None = None,
        train: bool = False,
        *,
        rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        """Predict from noisy images.

        Args:
            x: [B, H, W, C] noisy images, H = W = image_size, C = in_channels.
            t: [B] timesteps (int indices or continuous times), embedded as given.
            cond: the condition (`diffusion_jax.conditioning`): [B] int class labels (num_classes is
                the null label), or a dict of 'label', 'tokens'/'token_mask', 'context'/'context_mask',
                'pooled'; a missing entry (or None) is the null condition.
            train: enables dropout, whose keys come from `rngs` ('dropout' stream).
            rngs: e.g. `nnx.Rngs(dropout=key)`; may be None when not training.

        Returns:
            [B, H, W, C], or [B, H, W, 2C] with learn_sigma (mean output, then variance output).
        """
        h, hs, emb, context = self._encode(x, t, cond, train, rngs)
        return self._decode(h, hs, emb, context, train, rngs).astype(x.dtype)

    def _decode(
        self, h: jax.Array, hs: list[jax.Array], emb: jax.Array, context: Context, train: bool,
        rngs: nnx.Rngs | None,
    ) -> jax.Array:
        """The up path and the output head: the middle output h and the skip activations hs of `_encode`
        (consumed last first; a ControlNet adds its residuals to both first, `models.controlnet`)
        -> [B, H, W, C or 2C]."""
        for level in self.up:
            for stage in level.stages:
                h = stage(jnp.concatenate([h, hs.pop()], axis=-1), emb, train, rngs, context)
            if level.resample is not None:
                h = level.resample(h, emb, train, rngs)
        return self.conv_out(self.norm_out(h, silu=True))  # [B, H, W, C or 2C]
