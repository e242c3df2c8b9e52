"""DDPM on scikit-learn's embedded 8x8 digits, resized to 16x16: the offline default.

    python -m diffusion_jax.main --config=configs/ddpm_digits.py --workdir=runs/ddpm_digits
    python -m diffusion_jax.main --config=configs/ddpm_digits.py --workdir=runs/ddpm_digits --mode=eval
    # autoguidance (Karras et al. 2024) by the same run at step 500: sample or eval mode
    python -m diffusion_jax.main --config=configs/ddpm_digits.py --workdir=runs/ddpm_digits --mode=sample \
        --config.sample.guide_workdir=runs/ddpm_digits --config.sample.guide_step=500 \
        --config.sample.guidance_scale=2 --config.sample.sampler=dpm_solver++ --config.sample.steps=25

Sized to finish on a 2-core CPU in under 10 minutes: a small U-Net, Ho et al.'s
linear schedule and L_simple, and ancestral sampling respaced to 100 steps. Eval mode scores it
offline: the VLB in bits/dim on the 297 test digits and, from 1,500 samples (the size of the
train split the digits classifier's reference comes from), digits-FID and the IS analogue.
"""

import ml_collections

from diffusion_jax.config import base_config


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    config.data.name = "digits"
    config.data.image_size = 16
    config.model.ch = 32
    config.model.ch_mult = (1, 2, 2)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = (8,)
    config.model.dropout = 0.0
    config.optim.learning_rate = 1e-3
    config.optim.warmup_steps = 200
    config.training.batch_size = 64
    config.training.num_steps = 1500
    config.training.log_every = 100
    config.training.checkpoint_every = 500
    config.training.sample_every = 500
    config.training.ema_decays = (0.995,)
    config.sample.ema_decay = 0.995
    # Ancestral sampling respaced to 100 steps (improved DDPM §4). After this short a
    # training, deterministic DDIM (eta = 0) leaves visible noise in some digits; the
    # stochastic sampler corrects it.
    config.sample.sampler = "ddpm"
    config.sample.steps = 100
    config.sample.num_samples = 64
    config.sample.batch_size = 64
    config.sample.png_scale = 4
    config.eval.metrics = ("vlb_bpd", "digits")
    config.eval.num_samples = 1500
    return config
