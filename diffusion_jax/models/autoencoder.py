"""The KL-regularised autoencoder of latent diffusion, in Flax NNX, NHWC.

Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models"
(arXiv 2112.10752), §3.1 and Appendix G: an encoder E maps an image x [H, W, 3] to a
latent z = E(x) [H/f, W/f, c] and a decoder D maps it back, x~ = D(z). The "KL-reg."
variant makes E output a diagonal Gaussian posterior q(z|x) = N(mean, diag(exp(logvar)))
and adds a slight KL penalty towards N(0, I) to the reconstruction loss (Appendix G;
the released configs, configs/autoencoder/autoencoder_kl_*.yaml, weight it by
kl_weight = 1e-6), so that the latent keeps nearly all of the image's detail but is not
arbitrarily scaled. The convolutional trunk is the one of Ho et al.'s U-Net without
skip connections and time embedding: residual blocks of GroupNorm-SiLU-conv3x3, a middle
block with single-head self-attention, strided-conv downsampling and nearest-x2-plus-conv
upsampling.

Parameter layout. Attribute names follow diffusers' `AutoencoderKL`
(src/diffusers/models/autoencoders/autoencoder_kl.py and vae.py), so every parameter
path joined with '.' reads as that model's state-dict key with NNX leaf names
(`kernel` for a conv/linear `weight`, `scale` for a norm `weight`, `bias` as is):

    encoder.conv_in
    encoder.down_blocks.{i}.resnets.{j}.{norm1, conv1, norm2, conv2, conv_shortcut}
    encoder.down_blocks.{i}.downsamplers.0.conv          (every level but the last)
    encoder.mid_block.resnets.{0, 1}
    encoder.mid_block.attentions.0.{group_norm, to_q, to_k, to_v, to_out.0}
    encoder.conv_norm_out, encoder.conv_out              (2 * latent_channels: mean, logvar)
    quant_conv, post_quant_conv                          (1x1 convs)
    decoder.conv_in, decoder.mid_block (as the encoder's)
    decoder.up_blocks.{i}.resnets.{0 .. layers_per_block}
    decoder.up_blocks.{i}.upsamplers.0.conv              (every level but the last)
    decoder.conv_norm_out, decoder.conv_out

`decoder.up_blocks.0` is the deepest (lowest-resolution) level, as in diffusers. Only
the array layouts differ from PyTorch: conv kernels are [kh, kw, in, out] (torch:
[out, in, kh, kw]) and linear kernels [in, out] (torch: [out, in]); a weight importer
transposes them. With the Stable Diffusion configuration
(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4) the
model has diffusers' 83,653,863 parameters.

Differences from diffusers, all invisible to imported weights: GroupNorm uses
gcd(norm_num_groups, channels) groups, which is diffusers' 32 whenever the width is a
multiple of 32 and still a valid grouping for the narrow models of tests (diffusers
would refuse them); kernels are initialised as PyTorch's default (uniform with bound
1/sqrt(fan_in)), biases at zero (PyTorch draws those too). The latent scale of LDM §4.3.2
and Appendix D.1 (0.18215 for Stable Diffusion's VAE) is applied by the latent diffusion
model that uses this autoencoder, not here.
"""

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jax.typing import DTypeLike

from diffusion_jax.errors import ConfigError
from diffusion_jax.models.norm import GroupNorm

# PyTorch's default init of Conv2d/Linear weights (kaiming_uniform with a=sqrt(5)):
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)), i.e. variance scaling 1/3, fan_in, uniform.
torch_default_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # LDM's DiagonalGaussianDistribution clamps logvar to this range
NORM_EPS = 1e-6  # diffusers' resnet_eps / GroupNorm eps of the VAE


@struct.dataclass
class DiagonalGaussian:
    """q(z|x) = N(mean, diag(var)), LDM's `DiagonalGaussianDistribution` (Rombach et al. 2022, §3.1).

    Build it with `from_moments` (or `create`), which clip logvar to [-30, 20] as LDM
    does; the constructor stores what it is given. Arrays are [B, h, w, c] (any shape
    with a leading batch axis works). A pytree, so it passes through `jax.jit`.
    """

    mean: jax.Array  # [B, h, w, c]
    logvar: jax.Array  # [B, h, w, c], in [LOGVAR_MIN, LOGVAR_MAX]

    @classmethod
    def create(cls, mean: jax.Array, logvar: jax.Array) -> "DiagonalGaussian":
        """The Gaussian with this mean and log-variance, the latter clipped to [-30, 20]."""
        return cls(mean=mean, logvar=jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX))

    @classmethod
    def from_moments(cls, moments: jax.Array) -> "DiagonalGaussian":
        """Split [..., 2c] encoder moments into mean (first c channels) and logvar (last c)."""
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return cls.create(mean, logvar)

    @property
    def std(self) -> jax.Array:
        """exp(logvar / 2)."""
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        """exp(logvar)."""
        return jnp.exp(self.logvar)

    def sample(self, key: jax.Array) -> jax.Array:
        """z = mean + std * eps with eps ~ N(0, I): the reparameterisation (Kingma & Welling 2014, §2.4)."""
        eps = jax.random.normal(key, self.mean.shape, self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> jax.Array:
        """The most likely latent, the mean."""
        return self.mean

    def kl(self) -> jax.Array:
        """KL(q || N(0, I)) = 0.5 * sum(mean^2 + var - 1 - logvar) over all non-batch axes -> [B].

        The closed form for diagonal Gaussians (Kingma & Welling 2014, Appendix B), as LDM's
        `DiagonalGaussianDistribution.kl()`.
        """
        axes = tuple(range(1, self.mean.ndim))
        return 0.5 * jnp.sum(jnp.square(self.mean) + self.var - 1.0 - self.logvar, axis=axes)

    def nll(self, z: jax.Array) -> jax.Array:
        """-log q(z) = 0.5 * sum(log(2 pi) + logvar + (z - mean)^2 / var) over non-batch axes -> [B]."""
        axes = tuple(range(1, self.mean.ndim))
        return 0.5 * jnp.sum(math.log(2.0 * math.pi) + self.logvar + jnp.square(z - self.mean) / self.var, axis=axes)


def _conv(
    in_ch: int,
    out_ch: int,
    kernel: int,
    *,
    stride: int = 1,
    padding: str | Sequence[tuple[int, int]] = "SAME",
    rngs: nnx.Rngs,
    dtype: DTypeLike,
) -> nnx.Conv:
    """A kernel x kernel convolution with PyTorch's default initialisation (zero bias)."""
    return nnx.Conv(
        in_ch,
        out_ch,
        (kernel, kernel),
        strides=stride,
        padding=padding,
        kernel_init=torch_default_init,
        dtype=dtype,
        rngs=rngs,
    )


def _linear(in_features: int, out_features: int, *, rngs: nnx.Rngs, dtype: DTypeLike) -> nnx.Linear:
    """A dense layer with PyTorch's default initialisation (zero bias)."""
    return nnx.Linear(in_features, out_features, kernel_init=torch_default_init, dtype=dtype, rngs=rngs)


def _group_norm(channels: int, num_groups: int, *, rngs: nnx.Rngs, dtype: DTypeLike) -> GroupNorm:
    """GroupNorm (Wu & He 2018), eps 1e-6, with gcd(num_groups, channels) groups (see module docstring);
    `models.norm`'s, which takes the SiLU that follows in the same call."""
    return GroupNorm(channels, num_groups=math.gcd(num_groups, channels), epsilon=NORM_EPS, dtype=dtype, rngs=rngs)


class ResnetBlock(nnx.Module):
    """diffusers' `ResnetBlock2D` without time embedding (LDM's `ResnetBlock` with temb_channels=0).

    h = conv1(SiLU(norm1(x))); h = conv2(SiLU(norm2(h))); out = shortcut(x) + h, with
    `conv_shortcut` a 1x1 conv when the width changes (None otherwise).
    """

    def __init__(self, in_ch: int, out_ch: int, *, norm_num_groups: int, rngs: nnx.Rngs, dtype: DTypeLike):
        self.norm1 = _group_norm(in_ch, norm_num_groups, rngs=rngs, dtype=dtype)
        self.conv1 = _conv(in_ch, out_ch, 3, rngs=rngs, dtype=dtype)
        self.norm2 = _group_norm(out_ch, norm_num_groups, rngs=rngs, dtype=dtype)
        self.conv2 = _conv(out_ch, out_ch, 3, rngs=rngs, dtype=dtype)
        self.conv_shortcut = _conv(in_ch, out_ch, 1, rngs=rngs, dtype=dtype) if in_ch != out_ch else None

    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, H, W, in_ch] -> [B, H, W, out_ch]."""
        h = self.conv1(self.norm1(x, silu=True))  # [B, H, W, out_ch]
        h = self.conv2(self.norm2(h, silu=True))  # [B, H, W, out_ch]
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Attention(nnx.Module):
    """Single-head self-attention over the H*W positions, residual (LDM's `AttnBlock`, 1x1 convs there).

    diffusers' `Attention` as the VAE builds it (one head of width C, bias everywhere,
    residual connection): out = x + to_out.0(softmax(q k^T / sqrt(C)) v) with
    q, k, v = to_q, to_k, to_v of group_norm(x) (Vaswani et al. 2017, eq. 1).
    """

    def __init__(self, channels: int, *, norm_num_groups: int, rngs: nnx.Rngs, dtype: DTypeLike):
        self.group_norm = _group_norm(channels, norm_num_groups, rngs=rngs, dtype=dtype)
        self.to_q = _linear(channels, channels, rngs=rngs, dtype=dtype)
        self.to_k = _linear(channels, channels, rngs=rngs, dtype=dtype)
        self.to_v = _linear(channels, channels, rngs=rngs, dtype=dtype)
        self.to_out = nnx.List([_linear(channels, channels, rngs=rngs, dtype=dtype)])  # diffusers: [Linear, Dropout]

    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, H, W, C] -> [B, H, W, C]."""
        b, h, w, c = x.shape
        t = self.group_norm(x).reshape(b, h * w, c)  # [B, T, C], T = H*W
        q = self.to_q(t)[:, :, None, :]  # [B, T, 1, C]: one head of width C
        k = self.to_k(t)[:, :, None, :]
        v = self.to_v(t)[:, :, None, :]
        out = jax.nn.dot_product_attention(q, k, v)  # [B, T, 1, C], scale 1/sqrt(C)
        return x + self.to_out[0](out[:, :, 0, :]).reshape(b, h, w, c)


class Downsample(nnx.Module):
    """x2 downsampling: pad 0 before / 1 after each spatial axis, then a 3x3 conv with stride 2.

    diffusers' `Downsample2D(use_conv=True, padding=0)` (F.pad(x, (0, 1, 0, 1)) then a
    VALID conv) and LDM's `Downsample(with_conv=True)`: H, W -> floor(H/2), floor(W/2).
    """

    def __init__(self, channels: int, *, rngs: nnx.Rngs, dtype: DTypeLike):
        self.conv = _conv(channels, channels, 3, stride=2, padding=((0, 1), (0, 1)), rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, H, W, C] -> [B, H/2, W/2, C]."""
        return self.conv(x)


class Upsample(nnx.Module):
    """x2 upsampling: nearest neighbour, then a 3x3 conv (diffusers' `Upsample2D(use_conv=True)`)."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs, dtype: DTypeLike):
        self.conv = _conv(channels, channels, 3, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, H, W, C] -> [B, 2H, 2W, C]."""
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # [B, 2H, 2W, C]
        return self.conv(x)


def _resnets(in_ch: int, out_ch: int, num_layers: int, **kw) -> nnx.List:
    """`num_layers` ResnetBlocks, the first in_ch -> out_ch, the others out_ch -> out_ch."""
    return nnx.List([ResnetBlock(in_ch if j == 0 else out_ch, out_ch, **kw) for j in range(num_layers)])


class DownBlock(nnx.Module):
    """One encoder level (diffusers' `DownEncoderBlock2D`): `resnets`, then `downsamplers` (or None)."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        num_layers: int,
        *,
        downsample: bool,
        norm_num_groups: int,
        rngs: nnx.Rngs,
        dtype: DTypeLike,
    ):
        self.resnets = _resnets(in_ch, out_ch, num_layers, norm_num_groups=norm_num_groups, rngs=rngs, dtype=dtype)
        self.downsamplers = nnx.List([Downsample(out_ch, rngs=rngs, dtype=dtype)]) if downsample else None

    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, H, W, in_ch] -> [B, H/2, W/2, out_ch] (H, W kept at the last level)."""
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpBlock(nnx.Module):
    """One decoder level (diffusers' `UpDecoderBlock2D`): `resnets`, then `upsamplers` (or None)."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        num_layers: int,
        *,
        upsample: bool,
        norm_num_groups: int,
        rngs: nnx.Rngs,
        dtype: DTypeLike,
    ):
        self.resnets = _resnets(in_ch, out_ch, num_layers, norm_num_groups=norm_num_groups, rngs=rngs, dtype=dtype)
        self.upsamplers = nnx.List([Upsample(out_ch, rngs=rngs, dtype=dtype)]) if upsample else None

    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, H, W, in_ch] -> [B, 2H, 2W, out_ch] (H, W kept at the last level)."""
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class MidBlock(nnx.Module):
    """The middle block (diffusers' `UNetMidBlock2D`, LDM's mid.block_1/attn_1/block_2).

    resnets.0 -> attentions.0 (if `attention`) -> resnets.1, all at width `channels`.
    """

    def __init__(self, channels: int, *, attention: bool, norm_num_groups: int, rngs: nnx.Rngs, dtype: DTypeLike):
        kw = dict(norm_num_groups=norm_num_groups, rngs=rngs, dtype=dtype)
        first = ResnetBlock(channels, channels, **kw)
        self.attentions = nnx.List([Attention(channels, **kw)]) if attention else None
        second = ResnetBlock(channels, channels, **kw)  # built after the attention, as in diffusers
        self.resnets = nnx.List([first, second])

    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, H, W, C] -> [B, H, W, C]."""
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Encoder(nnx.Module):
    """x [B, H, W, in_channels] -> moments [B, H/f, W/f, 2 * latent_channels] (diffusers' `Encoder`, double_z)."""

    def __init__(
        self,
        in_channels: int,
        latent_channels: int,
        block_out_channels: Sequence[int],
        layers_per_block: int,
        *,
        mid_attention: bool,
        norm_num_groups: int,
        rngs: nnx.Rngs,
        dtype: DTypeLike,
    ):
        kw = dict(norm_num_groups=norm_num_groups, rngs=rngs, dtype=dtype)
        self.conv_in = _conv(in_channels, block_out_channels[0], 3, rngs=rngs, dtype=dtype)
        blocks = []
        prev = block_out_channels[0]
        for i, ch in enumerate(block_out_channels):
            last = i == len(block_out_channels) - 1
            blocks.append(DownBlock(prev, ch, layers_per_block, downsample=not last, **kw))
            prev = ch
        self.down_blocks = nnx.List(blocks)
        top = block_out_channels[-1]
        self.mid_block = MidBlock(top, attention=mid_attention, **kw)
        self.conv_norm_out = _group_norm(top, norm_num_groups, rngs=rngs, dtype=dtype)
        self.conv_out = _conv(top, 2 * latent_channels, 3, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, H, W, in_channels] -> [B, H/f, W/f, 2 * latent_channels]."""
        h = self.conv_in(x)  # [B, H, W, block_out_channels[0]]
        for block in self.down_blocks:
            h = block(h)  # halves H, W except at the last level
        h = self.mid_block(h)  # [B, H/f, W/f, block_out_channels[-1]]
        return self.conv_out(self.conv_norm_out(h, silu=True))


class Decoder(nnx.Module):
    """z [B, h, w, latent_channels] -> x [B, f*h, f*w, out_channels] (diffusers' `Decoder`).

    `up_blocks.0` works at the lowest resolution with block_out_channels[-1]; level i has
    layers_per_block + 1 resnets and, except for the last level, an upsampler.
    """

    def __init__(
        self,
        latent_channels: int,
        out_channels: int,
        block_out_channels: Sequence[int],
        layers_per_block: int,
        *,
        mid_attention: bool,
        norm_num_groups: int,
        rngs: nnx.Rngs,
        dtype: DTypeLike,
    ):
        kw = dict(norm_num_groups=norm_num_groups, rngs=rngs, dtype=dtype)
        top = block_out_channels[-1]
        self.conv_in = _conv(latent_channels, top, 3, rngs=rngs, dtype=dtype)
        self.mid_block = MidBlock(top, attention=mid_attention, **kw)
        reversed_channels = list(reversed(block_out_channels))
        blocks = []
        prev = top
        for i, ch in enumerate(reversed_channels):
            last = i == len(reversed_channels) - 1
            blocks.append(UpBlock(prev, ch, layers_per_block + 1, upsample=not last, **kw))
            prev = ch
        self.up_blocks = nnx.List(blocks)
        self.conv_norm_out = _group_norm(block_out_channels[0], norm_num_groups, rngs=rngs, dtype=dtype)
        self.conv_out = _conv(block_out_channels[0], out_channels, 3, rngs=rngs, dtype=dtype)

    def __call__(self, z: jax.Array) -> jax.Array:
        """[B, h, w, latent_channels] -> [B, f*h, f*w, out_channels]."""
        h = self.conv_in(z)  # [B, h, w, block_out_channels[-1]]
        h = self.mid_block(h)
        for block in self.up_blocks:
            h = block(h)  # doubles H, W except at the last level
        return self.conv_out(self.conv_norm_out(h, silu=True))  # [B, f*h, f*w, out_channels]


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}: must be a positive integer, got {value!r}")
    return value


class AutoencoderKL(nnx.Module):
    """LDM's KL-regularised autoencoder (Rombach et al. 2022, §3.1, Appendix G) with diffusers' names.

    encode: x -> Encoder -> quant_conv (1x1) -> DiagonalGaussian q(z|x);
    decode: z -> post_quant_conv (1x1) -> Decoder -> x~. The downsampling factor is
    f = 2 ** (len(block_out_channels) - 1): LDM's KL-f4 has three levels, KL-f8 (Stable
    Diffusion's VAE) four. Images are NHWC in [-1, 1]. The training loss of LDM is
    reconstruction + kl_weight * posterior.kl() (plus LPIPS and a patch GAN in the paper)
    with kl_weight = 1e-6 in LDM's configs; it lives with the objectives, not here.

    Args:
        in_channels: image channels (3 for RGB).
        out_channels: reconstruction channels; None means in_channels.
        block_out_channels: widths of the levels, shallowest first.
        layers_per_block: resnets per encoder level (the decoder has one more per level).
        latent_channels: channels c of the latent z [B, H/f, W/f, c].
        norm_num_groups: GroupNorm groups (32 in diffusers); gcd(norm_num_groups, width)
            is used so that narrow test models are valid.
        mid_attention: self-attention in the middle blocks (diffusers' mid_block_add_attention).
        rngs: parameter initialisation keys.
        dtype: computation dtype (parameters stay float32).

    Raises:
        ConfigError (a ValueError): when an argument is out of range, naming it.
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        out_channels: int | None = None,
        block_out_channels: Sequence[int] = (128, 256, 512, 512),
        layers_per_block: int = 2,
        latent_channels: int = 4,
        norm_num_groups: int = 32,
        mid_attention: bool = True,
        rngs: nnx.Rngs,
        dtype: DTypeLike = jnp.float32,
    ):
        in_channels = _positive_int("in_channels", in_channels)
        out_channels = in_channels if out_channels is None else _positive_int("out_channels", out_channels)
        if isinstance(block_out_channels, int | str) or not isinstance(block_out_channels, Sequence):
            raise ConfigError(
                f"block_out_channels: must be a sequence of positive integers, e.g. (128, 256, 512, 512); "
                f"got {block_out_channels!r}"
            )
        block_out_channels = tuple(block_out_channels)
        if not block_out_channels:
            raise ConfigError("block_out_channels: needs at least one level, e.g. (128, 256, 512, 512)")
        for ch in block_out_channels:
            _positive_int(f"block_out_channels (entry {ch!r})", ch)
        layers_per_block = _positive_int("layers_per_block", layers_per_block)
        latent_channels = _positive_int("latent_channels", latent_channels)
        norm_num_groups = _positive_int("norm_num_groups", norm_num_groups)
        if not isinstance(mid_attention, bool):
            raise ConfigError(f"mid_attention: must be True or False, got {mid_attention!r}")

        self.in_channels = in_channels
        self.out_channels = out_channels
        self.block_out_channels = block_out_channels
        self.layers_per_block = layers_per_block
        self.latent_channels = latent_channels
        kw = dict(mid_attention=mid_attention, norm_num_groups=norm_num_groups, rngs=rngs, dtype=dtype)
        # Construction order is diffusers': encoder, decoder, quant_conv, post_quant_conv.
        self.encoder = Encoder(in_channels, latent_channels, block_out_channels, layers_per_block, **kw)
        self.decoder = Decoder(latent_channels, out_channels, block_out_channels, layers_per_block, **kw)
        self.quant_conv = _conv(2 * latent_channels, 2 * latent_channels, 1, rngs=rngs, dtype=dtype)
        self.post_quant_conv = _conv(latent_channels, latent_channels, 1, rngs=rngs, dtype=dtype)

    @property
    def downsampling_factor(self) -> int:
        """f = 2 ** (number of levels - 1): the latent of an [H, W] image is [H/f, W/f]."""
        return 2 ** (len(self.block_out_channels) - 1)

    def encode(self, x: jax.Array) -> DiagonalGaussian:
        """Images [B, H, W, in_channels] in [-1, 1], H and W multiples of f -> q(z|x) over [B, H/f, W/f, c].

        Raises:
            ValueError: when x is not [B, H, W, in_channels] with H, W multiples of f
                (checked on the static shape, before compilation).
        """
        f = self.downsampling_factor
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(f"x: expected images [B, H, W, {self.in_channels}], got shape {x.shape}")
        if x.shape[1] % f or x.shape[2] % f:
            raise ValueError(f"x: height and width must be multiples of the downsampling factor {f}, got {x.shape}")
        moments = self.quant_conv(self.encoder(x))  # [B, H/f, W/f, 2c]
        return DiagonalGaussian.from_moments(moments)

    def decode(self, z: jax.Array) -> jax.Array:
        """Latents [B, h, w, latent_channels] -> images [B, f*h, f*w, out_channels].

        Raises:
            ValueError: when z is not [B, h, w, latent_channels].
        """
        if z.ndim != 4 or z.shape[-1] != self.latent_channels:
            raise ValueError(f"z: expected latents [B, h, w, {self.latent_channels}], got shape {z.shape}")
        return self.decoder(self.post_quant_conv(z))

    def __call__(
        self, x: jax.Array, *, key: jax.Array | None = None, sample_posterior: bool = True
    ) -> tuple[jax.Array, DiagonalGaussian]:
        """Reconstruct x through a sample of q(z|x) (`key` needed) or its mode.

        Args:
            x: [B, H, W, in_channels] images in [-1, 1].
            key: jax.random key for z ~ q(z|x); needed when `sample_posterior`.
            sample_posterior: sample z (training) or take the mean (evaluation).

        Returns:
            (reconstruction [B, H, W, out_channels], posterior q(z|x)).
        """
        posterior = self.encode(x)
        if sample_posterior:
            if key is None:
                raise ValueError("key: sampling the posterior needs a jax.random key; or pass sample_posterior=False")
            z = posterior.sample(key)
        else:
            z = posterior.mode()
        return self.decode(z), posterior
