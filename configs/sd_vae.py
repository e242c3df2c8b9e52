"""Stable Diffusion's KL autoencoder (f = 8, 4 latent channels) as a first-stage workdir: the VAE that
`configs/dit_xl2_imagenet256.py` and SD-style latent runs encode with.

NOT TRAINED HERE: it exists to hold `stabilityai/sd-vae-ft-ema` (or `-mse`) imported from diffusers
(`diffusion_jax.convert`; the discriminator, which the checkpoint lacks, starts as a new run's):

    python -m diffusion_jax.convert --from=sd-vae-ft-ema --model=sd_vae --out=weights/sd-vae-ft-ema

The architecture is diffusers' AutoencoderKL with SD's config.json: widths (128, 256, 512, 512), two
resnets per level, attention in the middle, GroupNorm of 32 groups; 256x256x3 images -> 32x32x4
latents, which SD and DiT scale by 0.18215 (`latent.scale_factor` of the latent run). The loss fields
are LDM's first-stage settings (Rombach et al. 2022, App. G; no LPIPS here), for fine-tuning it.
"""

import ml_collections

from diffusion_jax.config import base_config


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    config.data.update(name="imagenet2012", image_size=256, random_flip=True)
    config.model = ml_collections.ConfigDict(
        dict(
            name="autoencoder_kl", block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
            norm_num_groups=32, mid_attention=True, disc_layers=3, disc_ndf=64,
        )
    )
    config.training.objective = "autoencode"
    config.autoencode.update(kl_weight=1e-6, disc_start=50_001, disc_weight=0.5, rec_kind="l1", pixel_reduction="sum")
    config.optim.update(learning_rate=4.5e-6, b1=0.5, b2=0.9, warmup_steps=0)
    config.training.update(batch_size=8, ema_decays=(0.999,))
    config.sample.update(ema_decay=None, num_samples=8, batch_size=8)
    config.eval.metrics = ("psnr", "ssim")
    return config
