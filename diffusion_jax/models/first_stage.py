"""LDM's first stage as trained: the KL autoencoder and its patch discriminator in one module.

`training.objective='autoencode'` trains this pair (Rombach et al. 2022, arXiv 2112.10752, §3.1
and Appendix G; `diffusion_jax.autoencoder_loss`). Keeping both in one parameter tree lets the
codebase's one train state, one optimiser and one checkpoint hold them: Adam is elementwise, so one
Adam over the union of the two trees is exactly LDM's two Adams (one per optimizer_idx) with equal
settings, and the train step differentiates the generator's loss with respect to the autoencoder
and the discriminator's with respect to the discriminator. A latent diffusion run loads the
`autoencoder` half of such a workdir frozen (`diffusion_jax.latent`).
"""

from collections.abc import Sequence

import jax.numpy as jnp
from flax import nnx
from jax.typing import DTypeLike

from diffusion_jax.errors import ConfigError
from diffusion_jax.models.autoencoder import AutoencoderKL
from diffusion_jax.models.discriminator import PatchDiscriminator, min_image_size


class FirstStage(nnx.Module):
    """`autoencoder` (an `AutoencoderKL`) and `discriminator` (a `PatchDiscriminator`, or None).

    Args:
        image_size, in_channels: the data's images (filled from `config.data`).
        block_out_channels, layers_per_block, latent_channels, norm_num_groups, mid_attention:
            the autoencoder's (`AutoencoderKL`).
        disc_layers: the discriminator's stride-2 layers (LDM: 3); 0 trains without a GAN.
        disc_ndf: the discriminator's first width (LDM: 64).
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        *,
        block_out_channels: Sequence[int] = (128, 256, 512, 512),
        layers_per_block: int = 2,
        latent_channels: int = 4,
        norm_num_groups: int = 32,
        mid_attention: bool = True,
        disc_layers: int = 3,
        disc_ndf: int = 64,
        rngs: nnx.Rngs,
        dtype: DTypeLike = jnp.float32,
    ):
        self.autoencoder = AutoencoderKL(
            in_channels=in_channels, block_out_channels=block_out_channels, layers_per_block=layers_per_block,
            latent_channels=latent_channels, norm_num_groups=norm_num_groups, mid_attention=mid_attention,
            rngs=rngs, dtype=dtype,
        )
        f = self.autoencoder.downsampling_factor
        if image_size % f:
            raise ConfigError(f"data.image_size: {image_size} is not a multiple of the autoencoder's downsampling "
                              f"factor {f} (model.block_out_channels has {len(block_out_channels)} levels)")
        if disc_layers and image_size < min_image_size(disc_layers):
            raise ConfigError(f"model.disc_layers: {disc_layers} stride-2 layers need images of at least "
                              f"{min_image_size(disc_layers)} pixels, data.image_size is {image_size}")
        self.discriminator = (
            PatchDiscriminator(in_channels, ndf=disc_ndf, n_layers=disc_layers, rngs=rngs, dtype=dtype)
            if disc_layers else None
        )
        self.image_size = image_size
