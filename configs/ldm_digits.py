"""Latent diffusion with text cross-attention on the embedded digits (Rombach et al. 2022).

    python -m diffusion_jax.main --config=configs/ae_digits.py --workdir=runs/ae_digits     # the first stage
    python -m diffusion_jax.main --config=configs/ldm_digits.py --workdir=runs/ldm_digits \\
        --config.latent.autoencoder_workdir=runs/ae_digits
    python -m diffusion_jax.main --config=configs/ldm_digits.py --workdir=runs/ldm_digits --mode=eval \\
        --config.latent.autoencoder_workdir=runs/ae_digits

A U-Net on the 4x4x4 latents of `ae_digits` (scaled by LDM's 1/std of the first batch), conditioned
only on text: a caption per image composed from its digit and its measured thickness and slant
(`data.captions`: "a thick seven", "the digit 2 in fine strokes, leaning left"), read by a small
transformer text encoder trained jointly (LDM §3.3's τ_θ) whose context feeds SpatialTransformer
cross-attention at every attention resolution and whose pooled output joins the time embedding.
The whole caption is dropped 10% of the time (classifier-free guidance, Ho & Salimans 2022), and
samples are drawn with DDIM-50 and guidance s = 2. Eval mode scores decoded samples with the offline
digits classifier (accuracy of the captioned digit) and checks the captioned thickness and slant
with the same measures that wrote the captions (`captions.follows_levels`).
"""

import ml_collections

from diffusion_jax.config import base_config


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    config.data.name = "digits"
    config.data.image_size = 16
    config.data.captions = True
    config.latent.autoencoder_workdir = "runs/ae_digits"
    config.model.ch = 64
    config.model.ch_mult = (1, 2)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = (4, 2)
    config.model.num_heads = 4
    config.model.dropout = 0.0
    config.model.text_encoder = ml_collections.ConfigDict(dict(width=64, depth=2, num_heads=4))
    config.diffusion.schedule = "scaled_linear"  # LDM's schedule (beta 0.00085 -> 0.012, T = 1000)
    config.optim.learning_rate = 1e-3
    config.optim.warmup_steps = 200
    config.training.batch_size = 64
    config.training.num_steps = 3000
    config.training.log_every = 100
    config.training.checkpoint_every = 1000
    config.training.sample_every = 1000
    config.training.label_dropout = 0.1  # the whole caption, for classifier-free guidance
    config.training.ema_decays = (0.995,)
    config.sample.ema_decay = 0.995
    config.sample.sampler = "ddim"
    config.sample.steps = 50
    config.sample.guidance_scale = 2.0
    config.sample.num_samples = 50
    config.sample.batch_size = 50
    config.sample.png_scale = 4
    config.eval.metrics = ("digits",)
    config.eval.num_samples = 500
    return config
