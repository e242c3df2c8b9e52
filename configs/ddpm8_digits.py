"""Stage 1 of the digits cascade: a small DDPM on the 8x8 digits at their own resolution.

    python -m diffusion_jax.main --config=configs/ddpm8_digits.py --workdir=runs/ddpm8_digits

The digits are 8x8 in scikit-learn, so at `data.image_size=8` the pipeline reads them unresized. A tiny
U-Net (two levels, 8 and 4, attention at 4), v-prediction on the cosine schedule with L_simple (the settings
of the README's 16x16 baseline), ancestral sampling respaced to 100 steps. `configs/sr_digits.py`
super-resolves its samples to 16x16 (`sample.low_res_workdir`; see "Super-resolution and cascades" in
the README).
"""

import ml_collections

from diffusion_jax.config import base_config


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    config.data.name = "digits"
    config.data.image_size = 8
    config.model.ch = 32
    config.model.ch_mult = (1, 2)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = (4,)
    config.model.dropout = 0.0
    config.diffusion.prediction = "v"  # as the 16x16 baseline (runs/ddpm_v_digits) and sr_digits
    config.diffusion.schedule = "cosine"
    config.optim.learning_rate = 1e-3
    config.optim.warmup_steps = 200
    config.training.batch_size = 64
    config.training.num_steps = 1500
    config.training.log_every = 100
    config.training.checkpoint_every = 500
    config.training.sample_every = 500
    config.training.ema_decays = (0.995,)
    config.sample.ema_decay = 0.995
    config.sample.sampler = "ddpm"
    config.sample.steps = 100
    config.sample.num_samples = 64
    config.sample.batch_size = 64
    config.sample.png_scale = 8
    config.eval.metrics = ("vlb_bpd",)
    return config
