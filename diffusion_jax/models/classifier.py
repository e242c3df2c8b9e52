"""ADM's noise-aware classifier: the U-Net's encoder half with a pooled head (NHWC).

Dhariwal & Nichol 2021 (arXiv 2105.05233, §4.1 and Appendix; guided-diffusion's
`EncoderUNetModel` with `pool='adaptive'`): the time embedding, input blocks and
middle block of the U-Net, then GroupNorm -> SiLU -> global average pool -> a
zero-initialised linear layer to `num_classes` logits. It models p(y | x_t, t) for
classifier guidance (`guidance.classifier_grad`) and is trained on noised images
(`classifier_loss.noisy_classifier_loss`).
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import DTypeLike

from diffusion_jax.models.layers import group_norm, linear
from diffusion_jax.models.unet import Blocks, Encoder


class EncoderUNet(Encoder):
    """Noise-aware image classifier: the `UNet`'s down path and middle block, average-pooled.

    x [B, H, W, C], t [B] -> logits [B, num_classes]. The arguments mean what they mean
    for `UNet` (same checks, same blocks, same parameter names for the shared half);
    `num_classes` here is the number of output logits, and the model takes no labels.
    ADM's ImageNet classifiers use ch=128, num_res_blocks=2 (their `classifier_depth`),
    attention at 32, 16, 8, `use_scale_shift_norm=True` and `resblock_updown=True`.

    Raises:
        ConfigError: as `UNet`, for sizes, attention resolutions and heads.
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        num_classes: int,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 1, 2, 2, 4, 4),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (32, 16, 8),
        dropout: float = 0.0,
        num_heads: int = 1,
        num_head_channels: int | None = 64,
        use_scale_shift_norm: bool = True,
        resblock_updown: bool = True,
        *,
        rngs: nnx.Rngs,
        dtype: DTypeLike = jnp.float32,
    ):
        blocks = Blocks(
            image_size, ch, ch_mult, num_res_blocks, attn_resolutions, dropout, num_heads, num_head_channels,
            use_scale_shift_norm, resblock_updown, rngs=rngs, dtype=dtype,
        )
        self._build_encoder(blocks, in_channels, num_classes=None)  # the time embedding only
        self.num_classes = num_classes
        width = ch * blocks.ch_mult[-1]
        self.norm_out = group_norm(width, rngs=rngs, dtype=dtype)
        self.head = linear(width, num_classes, zero_init=True, rngs=rngs, dtype=dtype)

    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        cond: jax.Array | None = None,
        train: bool = False,
        *,
        rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        """Class logits of noisy images.

        Args:
            x: [B, H, W, C] noisy images x_t, H = W = image_size, C = in_channels.
            t: [B] timesteps (the model time the diffusion was trained with), embedded as given.
            cond: must be None (the classifier predicts the label; it is not given one).
            train: enables dropout, whose keys come from `rngs` ('dropout' stream).
            rngs: e.g. `nnx.Rngs(dropout=key)`; may be None when not training.

        Returns:
            [B, num_classes] float32 logits of p(y | x_t, t).
        """
        if cond is not None:
            raise ValueError("cond: the noise-aware classifier predicts labels and takes none; pass cond=None")
        h, _, _, _ = self._encode(x, t, None, train, rngs)  # [B, h, w, ch * ch_mult[-1]]
        h = jnp.mean(self.norm_out(h, silu=True), axis=(1, 2))  # [B, width]
        return self.head(h).astype(jnp.float32)  # [B, num_classes]
