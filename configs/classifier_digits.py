"""A noise-aware digit classifier for classifier guidance (Dhariwal & Nichol 2021, arXiv 2105.05233).

    # 1. Train the classifier on noised 16x16 digits (about 4 minutes on 2 CPU cores)
    python -m diffusion_jax.main --config=configs/classifier_digits.py --workdir=runs/classifier_digits
    # 2. Guide the unconditional DDPM of configs/ddpm_digits.py with it: a 10x10 grid, column j = digit j
    python -m diffusion_jax.main --config=configs/ddpm_digits.py --workdir=runs/ddpm_digits --mode=sample \
        --config.sample.classifier_workdir=runs/classifier_digits --config.sample.classifier_scale=4 \
        --config.sample.num_samples=100 --config.sample.batch_size=100

ADM's `EncoderUNetModel` (the U-Net's encoder half with scale-shift norm, ResBlock
resampling and an average-pooled head) at the width of configs/ddpm_digits.py, trained
with the softmax cross-entropy at t ~ U{0..T-1} on x_t ~ q(x_t | x_0) under the same
schedule as configs/ddpm_digits.py (Ho et al.'s linear, T = 1000), so the classifier can be
called at that model's timesteps. The 'ddpm' sampler guides with Algorithm 1 (the mean
shift), every other sampler with Algorithm 2 (eps - sigma_t s grad log p(y | x_t)).
"""

import ml_collections

from diffusion_jax.config import base_config


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    config.data.name = "digits"
    config.data.image_size = 16
    config.model = ml_collections.ConfigDict(
        dict(
            name="classifier",
            num_classes=10,
            ch=32,
            ch_mult=(1, 2, 2),
            num_res_blocks=1,
            attn_resolutions=(8,),
            dropout=0.0,
            num_heads=1,
            num_head_channels=32,
            use_scale_shift_norm=True,
            resblock_updown=True,
        )
    )
    config.training.objective = "classify"
    config.optim.learning_rate = 1e-3
    config.optim.warmup_steps = 100
    config.training.batch_size = 64
    config.training.num_steps = 1500
    config.training.log_every = 100
    config.training.checkpoint_every = 500
    config.training.ema_decays = (0.995,)
    config.sample.ema_decay = 0.995  # the weights a guided run loads from this workdir
    return config
