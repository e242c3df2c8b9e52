"""LDM's first stage on the embedded digits: a KL autoencoder (f = 4) with a patch discriminator.

    python -m diffusion_jax.main --config=configs/ae_digits.py --workdir=runs/ae_digits

Rombach et al. 2022 (arXiv 2112.10752), §3.1 and Appendix G, at digits size: 16x16x1 images to
4x4x4 latents (f = 4, c = 4: the 64 numbers of the digits' native 8x8), an AutoencoderKL of widths
(32, 64, 64) with one resnet per level, trained with L1 + 1e-6 KL (LDM's kl_weight, the L1 summed
over pixels as LDM sums it) and, from step `autoencode.disc_start`, the hinge patch GAN with the
adaptive weight (Esser et al. 2021, eq. (7)). No perceptual (LPIPS) loss: its VGG weights are a
download, and this config runs offline. The samples it writes are held-out test digits beside
their reconstructions. `configs/ldm_digits.py` trains a latent diffusion model on its latents.
"""

import ml_collections

from diffusion_jax.config import base_config


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    config.data.name = "digits"
    config.data.image_size = 16
    config.model = ml_collections.ConfigDict(
        dict(
            name="autoencoder_kl", block_out_channels=(32, 64, 64), layers_per_block=1, latent_channels=4,
            norm_num_groups=32, mid_attention=True, disc_layers=2, disc_ndf=32,
        )
    )
    config.training.objective = "autoencode"
    config.autoencode.update(kl_weight=1e-6, disc_start=1001, disc_weight=0.5, rec_kind="l1", pixel_reduction="sum")
    config.optim.learning_rate = 4.5e-4
    config.optim.b1 = 0.5  # LDM's first stage: Adam(betas=(0.5, 0.9))
    config.optim.b2 = 0.9
    config.optim.warmup_steps = 0
    config.training.batch_size = 64
    config.training.num_steps = 2000
    config.training.log_every = 100
    config.training.checkpoint_every = 1000
    config.training.sample_every = 1000
    config.training.ema_decays = (0.999,)
    config.sample.ema_decay = None  # LDM's autoencoders are used without an EMA
    config.sample.num_samples = 32
    config.sample.batch_size = 32
    config.sample.png_scale = 4
    config.eval.metrics = ("psnr", "ssim", "digits")  # of the 297 test digits' reconstructions
    return config
