"""ControlNet (Zhang, Rao & Agrawala 2023, arXiv 2302.05543) on the DDPM / ADM U-Net, NHWC.

A frozen, trained `UNet` ('base') and a trainable copy of its encoder half ('control'): the copy sees
the noisy image and a control image (edges, a coarse mask; `diffusion_jax.controlnet` makes them from
the data), and its activations reach the frozen network only through zero-initialised 1x1
convolutions added to the base's skip connections and middle output (§3.2, Fig. 3):

    y_c = F(x; Θ) + Z(F(x + Z(c; Θ_z1); Θ_c); Θ_z2)        (Eq. 2)

so at initialisation the controlled model is exactly the base model, and training moves only the copy
(the forward pass stops the base's gradient, and `training.optimizer` zeroes its updates).
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import DTypeLike

from diffusion_jax import conditioning
from diffusion_jax.errors import ConfigError
from diffusion_jax.models.layers import linear
from diffusion_jax.models.unet import Blocks, Encoder, UNet, _conv3x3

BASE_ONLY = ("learn_sigma", "out_channels")  # `UNet` arguments of the output head, which the copy lacks


class HintEncoder(nnx.Module):
    """The condition encoder E of Eq. 3, c_f = E(c_i): control image [B, H, W, C_c] -> features
    [B, H, W, hint_channels]. The paper's four stride-2 4x4 convs bring a 512x512 image to Stable Diffusion's
    64x64 latent grid; a pixel-space U-Net needs no downsampling, so here two 3x3 convs with SiLU (the official
    `input_hint_block`'s activation) at full resolution."""

    def __init__(self, control_channels: int, hint_channels: int, *, rngs: nnx.Rngs, dtype: DTypeLike):
        self.conv1 = _conv3x3(control_channels, hint_channels, rngs=rngs, dtype=dtype)
        self.conv2 = _conv3x3(hint_channels, hint_channels, rngs=rngs, dtype=dtype)

    def __call__(self, c: jax.Array) -> jax.Array:
        """[B, H, W, C_c] -> [B, H, W, hint_channels]."""
        return nnx.silu(self.conv2(nnx.silu(self.conv1(c))))


class ControlNet(Encoder):
    """The trainable copy (Θ_c) of a `UNet`'s encoder with the hint encoder and the zero convolutions.

    Its `cond`, `conv_in`, `down` and `mid_*` have the base encoder's parameter paths, so a run copies the
    base's weights into them at step 0 (`diffusion_jax.controlnet.with_base`, as the paper initialises the
    copy). The condition enters through `conv_in`, which reads [x, E(c)]: its kernel's E(c) slice is
    zero-initialised, so conv_in(x, E(c)) = conv_in_base(x) + Z(E(c)), the paper's first zero convolution
    Z(c; Θ_z1) (a 3x3 one, as the official code's last hint conv) added to the first feature map. Each skip
    activation and the middle output then pass a zero-initialised 1x1 convolution (Θ_z2).

    The arguments mean what they mean for `UNet` (same checks, same blocks); `control_channels` C_c is the
    control image's channels and `hint_channels` the width of E(c).

    Raises:
        ConfigError: as `UNet`, and for a `low_res_size` (a super-resolution U-Net is not supported).
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        control_channels: int = 1,
        hint_channels: int = 16,
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
        *,
        rngs: nnx.Rngs,
        dtype: DTypeLike = jnp.float32,
        remat: bool = False,
        context_dim: int | None = None,
        transformer_depth: int = 1,
        pooled_dim: int | None = None,
        text_encoder: dict | None = None,
        time_freq_shift: float = 0.0,
        norm_eps: float = 1e-6,
        downsample_padding: int | None = None,
        low_res_size: int | None = None,
    ):
        if low_res_size is not None:
            raise ConfigError(f"model.low_res_size: got {low_res_size}; a ControlNet steers a U-Net without a "
                              "super-resolution input: leave it None")
        if text_encoder is not None:
            context_dim = context_dim or text_encoder.get("width")
        blocks = Blocks(
            image_size, ch, ch_mult, num_res_blocks, attn_resolutions, dropout, num_heads, num_head_channels,
            use_scale_shift_norm, resblock_updown, rngs=rngs, dtype=dtype, remat=remat, context_dim=context_dim,
            transformer_depth=transformer_depth, norm_eps=norm_eps, downsample_padding=downsample_padding,
        )
        self.control_channels = control_channels
        self.hint = HintEncoder(control_channels, hint_channels, rngs=rngs, dtype=dtype)
        skip_chans = self._build_encoder(blocks, in_channels + hint_channels, num_classes, pooled_dim, text_encoder,
                                         time_freq_shift)
        kernel = self.conv_in.kernel  # [3, 3, C + hint_channels, ch]: the E(c) slice is Z(c; Θ_z1)
        kernel.value = kernel.value.at[:, :, in_channels:, :].set(0.0)
        self.zero_convs = nnx.List([linear(c, c, zero_init=True, rngs=rngs, dtype=dtype) for c in skip_chans])
        width = ch * blocks.ch_mult[-1]
        self.mid_zero = linear(width, width, zero_init=True, rngs=rngs, dtype=dtype)

    def __call__(
        self, x: jax.Array, t: jax.Array, cond: conditioning.Cond, control: jax.Array, train: bool = False,
        *, rngs: nnx.Rngs | None = None,
    ) -> tuple[jax.Array, list[jax.Array]]:
        """x [B, H, W, C], t [B], the base's condition and control [B, H, W, C_c] -> (the middle residual
        [B, h, w, ch*ch_mult[-1]], one residual per skip activation of `Encoder._encode`, shaped like it)."""
        expected = (x.shape[0], self.image_size, self.image_size, self.control_channels)
        if control.shape != expected:
            raise ValueError(f"cond['control']: the ControlNet expects a control image of shape {list(expected)} "
                             f"([B, data.image_size, data.image_size, C_c]), got {list(control.shape)}")
        hint = self.hint(control.astype(x.dtype))  # [B, H, W, hint_channels]
        h, hs, _, _ = self._encode(jnp.concatenate([x, hint], axis=-1), t, cond, train, rngs)
        return self.mid_zero(h), [zero(s) for zero, s in zip(self.zero_convs, hs, strict=True)]


class ControlledUNet(nnx.Module):
    """A frozen `UNet` ('base') steered by a `ControlNet` ('control'): the registered model 'controlnet_unet'.

    The control residuals are added to the base's skip activations and middle output before its up path
    (the official `ControlledUnetModel`: h += control.pop(); h = cat([h, hs.pop() + control.pop()])). The
    base runs deterministically (no dropout: it is frozen) and under `stop_gradient`, so backpropagation
    computes no weight gradients for it; gradients still flow through its activations to the copy.

    Args:
        image_size, in_channels: as `UNet`.
        control_channels: C_c of the control image `cond['control']` [B, H, W, C_c].
        hint_channels: the width of the hint encoder E(c).
        **unet_kwargs: the base `UNet`'s other arguments (`model.*`); the copy takes the same, less the
            output head's (`learn_sigma`, `out_channels`).

    Call: `model(x, t, cond, train, rngs=...)` with `cond` a dict holding 'control' (a missing one is the null
    control, zeros) and any entries the base takes; returns what the base returns.
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        control_channels: int = 1,
        hint_channels: int = 16,
        *,
        rngs: nnx.Rngs,
        dtype: DTypeLike = jnp.float32,
        **unet_kwargs,
    ):
        self.base = UNet(image_size, in_channels, rngs=rngs, dtype=dtype, **unet_kwargs)
        shared = {k: v for k, v in unet_kwargs.items() if k not in BASE_ONLY}
        self.control = ControlNet(image_size, in_channels, control_channels, hint_channels, rngs=rngs, dtype=dtype,
                                  **shared)

    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        cond: conditioning.Cond = None,
        train: bool = False,
        *,
        rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        """x [B, H, W, C], t [B] -> the base's output [B, H, W, C] (2C with learn_sigma), steered by
        cond['control']."""
        entries = conditioning.as_dict(cond)
        control = entries.pop("control", None)
        if control is None:
            control = jnp.zeros((x.shape[0], self.base.image_size, self.base.image_size,
                                 self.control.control_channels), x.dtype)
        base_cond = entries or None
        graphdef, params = nnx.split(self.base)
        base = nnx.merge(graphdef, jax.lax.stop_gradient(params))  # frozen: no weight gradients
        h, hs, emb, context = base._encode(x, t, base_cond, False, None)
        mid, skips = self.control(x, t, base_cond, control, train, rngs=rngs)
        hs = [s + r for s, r in zip(hs, skips, strict=True)]
        return base._decode(h + mid, hs, emb, context, False, None).astype(x.dtype)
