"""The PatchGAN discriminator of LDM's autoencoder training, in Flax NNX, NHWC.

Isola et al. 2017, "Image-to-Image Translation with Conditional Adversarial Networks"
(pix2pix, arXiv 1611.07004, §3.2.2): a fully convolutional discriminator that classifies
each N x N patch of an image as real or fake and outputs a map of logits; averaging the
per-patch losses penalises structure at the scale of the patches (the 70 x 70 receptive
field of the default three layers). Esser et al. 2021 (taming-transformers, arXiv
2012.09841, §3.1) use it, as `NLayerDiscriminator`, for the adversarial term of VQGAN's
loss, and Rombach et al. 2022 (LDM, arXiv 2112.10752, Appendix G) reuse it unchanged for
their KL and VQ autoencoders (`LPIPSWithDiscriminator`, n_layers=3, ndf=64).

Architecture (taming's `NLayerDiscriminator`, every conv 4 x 4 with padding 1 on each side):

    conv(in -> ndf, stride 2) -> LeakyReLU(0.2)
    for i in 1 .. n_layers-1: conv(ndf*m(i-1) -> ndf*m(i), stride 2) -> norm -> LeakyReLU(0.2)
    conv(ndf*m(n_layers-1) -> ndf*m(n_layers), stride 1) -> norm -> LeakyReLU(0.2)
    conv(ndf*m(n_layers) -> 1, stride 1)                      (the logits, no activation)

with m(i) = min(2**i, 8). A stride-2 conv maps a side s to floor(s/2), a stride-1 conv to
s - 1, so an [H, W] image gives logits [floor(H / 2**n_layers) - 2, ...]: 30 x 30 for a
256 x 256 image and n_layers=3 (pix2pix's 70 x 70 PatchGAN), 2 x 2 for a 16 x 16 image and
n_layers=2. The geometry is kept as in taming (no 'SAME' padding) so that the patches and
the output size are the reference ones; an image too small for `n_layers`
(H or W < 3 * 2**n_layers) is rejected with a ValueError naming both, before compilation.

Deviation from LDM: normalisation. LDM (and taming by default) normalise with BatchNorm,
whose running statistics are state other than parameters and whose training-mode output
couples the examples of a batch. The models of this codebase hold only `nnx.Param` state,
so this module uses GroupNorm (Wu & He 2018) with gcd(32, channels) groups instead, the
normalisation of every other model here: per example, no batch statistics, the same in
training and evaluation. The alternatives were worse fits: taming's ActNorm (Kingma &
Dhariwal 2018) needs a data-dependent initialisation and an `initialized` buffer (state
that is not a parameter, and an initialisation pass over data), and no normalisation
changes the conditioning of the deeper layers more than a per-example norm does. As with
taming's BatchNorm layout, the convs followed by a norm have no bias (GroupNorm's shift
makes one redundant), so the conv kernels have the shapes of LDM's checkpoints; a BatchNorm
discriminator's weights are not interchangeable with these anyway.

Initialisation follows taming's `weights_init`: conv kernels N(0, 0.02^2), norm scales
N(1, 0.02^2), biases 0.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import DTypeLike

from diffusion_jax.errors import ConfigError

LEAKY_SLOPE = 0.2  # LeakyReLU(0.2), pix2pix and taming
KERNEL_SIZE = 4
PADDING = 1  # on each side, as taming's padw = 1

_conv_init = nnx.initializers.normal(0.02)  # taming's weights_init: Conv weight ~ N(0, 0.02)


def _scale_init(key: jax.Array, shape: tuple[int, ...], dtype: DTypeLike = jnp.float32) -> jax.Array:
    """taming's weights_init for norm weights: N(1, 0.02^2)."""
    return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


def _conv(in_ch: int, out_ch: int, stride: int, *, use_bias: bool, rngs: nnx.Rngs, dtype: DTypeLike) -> nnx.Conv:
    """A 4x4 conv with padding 1 on each side (PyTorch's padding=1), taming's initialisation."""
    return nnx.Conv(
        in_ch,
        out_ch,
        (KERNEL_SIZE, KERNEL_SIZE),
        strides=stride,
        padding=((PADDING, PADDING), (PADDING, PADDING)),
        use_bias=use_bias,
        kernel_init=_conv_init,
        dtype=dtype,
        rngs=rngs,
    )


def _conv_output_size(size: int, stride: int) -> int:
    """floor((size + 2*padding - kernel) / stride) + 1."""
    return (size + 2 * PADDING - KERNEL_SIZE) // stride + 1


def patch_output_size(size: int, n_layers: int) -> int:
    """The side of the logit map for an input side `size` (<= 0: the image is too small).

    n_layers stride-2 convs (side -> floor(side / 2)), then two stride-1 convs (side -> side - 1).
    """
    for _ in range(n_layers):
        size = _conv_output_size(size, 2)
    for _ in range(2):
        size = _conv_output_size(size, 1)
    return size


def min_image_size(n_layers: int) -> int:
    """The smallest side that gives at least one logit: 3 * 2**n_layers (24 for n_layers=3)."""
    return 3 * 2**n_layers


class PatchDiscriminator(nnx.Module):
    """PatchGAN discriminator (Isola et al. 2017, §3.2.2), taming's `NLayerDiscriminator` with GroupNorm.

    See the module docstring for the layers and the deviation from LDM (GroupNorm, not BatchNorm).

    Parameters: `convs.{0 .. n_layers+1}` (kernels [4, 4, in, out]; biases only on `convs.0`
    and the last) and `norms.{0 .. n_layers-1}` (GroupNorm after `convs.{1 .. n_layers}`).

    Args:
        in_channels: image channels (3 for RGB).
        ndf: width of the first layer; layer i has ndf * min(2**i, 8) channels (taming: 64).
        n_layers: number of stride-2 convs (taming and LDM: 3, the 70 x 70 PatchGAN).
        rngs: parameter initialisation keys.
        dtype: computation dtype (parameters stay float32).

    Raises:
        ConfigError (a ValueError): when an argument is not a positive integer, naming it.
    """

    def __init__(
        self,
        in_channels: int,
        *,
        ndf: int = 64,
        n_layers: int = 3,
        rngs: nnx.Rngs,
        dtype: DTypeLike = jnp.float32,
    ):
        for name, value in (("in_channels", in_channels), ("ndf", ndf), ("n_layers", n_layers)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}: must be a positive integer, got {value!r}")
        self.in_channels = in_channels
        self.n_layers = n_layers
        widths = [ndf * min(2**i, 8) for i in range(n_layers + 1)]  # widths[i] = ndf * m(i)
        convs = [_conv(in_channels, widths[0], 2, use_bias=True, rngs=rngs, dtype=dtype)]
        norms = []
        for i in range(1, n_layers + 1):
            stride = 2 if i < n_layers else 1
            convs.append(_conv(widths[i - 1], widths[i], stride, use_bias=False, rngs=rngs, dtype=dtype))
            norms.append(
                nnx.GroupNorm(
                    widths[i], num_groups=math.gcd(32, widths[i]), scale_init=_scale_init, dtype=dtype, rngs=rngs
                )
            )
        convs.append(_conv(widths[n_layers], 1, 1, use_bias=True, rngs=rngs, dtype=dtype))
        self.convs = nnx.List(convs)
        self.norms = nnx.List(norms)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Images [B, H, W, in_channels] -> patch logits [B, h, w, 1], h = floor(H / 2**n_layers) - 2.

        Raises:
            ValueError: when x is not [B, H, W, in_channels], or H or W is smaller than
                3 * 2**n_layers (the logit map would be empty); checked on the static shape.
        """
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(f"x: expected images [B, H, W, {self.in_channels}], got shape {x.shape}")
        h, w = x.shape[1], x.shape[2]
        if min(h, w) < min_image_size(self.n_layers):
            raise ValueError(
                f"x: a {h}x{w} image is too small for the PatchGAN discriminator with n_layers={self.n_layers} "
                f"(needs H, W >= 3 * 2**n_layers = {min_image_size(self.n_layers)}); use a smaller n_layers"
            )
        x = jax.nn.leaky_relu(self.convs[0](x), LEAKY_SLOPE)  # [B, H/2, W/2, ndf]
        for conv, norm in zip(self.convs[1:-1], self.norms, strict=True):
            x = jax.nn.leaky_relu(norm(conv(x)), LEAKY_SLOPE)  # halves H, W except at the last, which takes 1 off
        return self.convs[-1](x)  # [B, h, w, 1]
