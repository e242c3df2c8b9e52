"""A small class-conditional DiT (Peebles & Xie 2023) on the embedded 16x16 digits: trains on a CPU.

    python -m diffusion_jax.main --config=configs/dit_digits.py --workdir=runs/dit_digits

DiT's recipe at digits scale: patch 2 on 16x16x1 images (64 tokens), 6 adaLN-Zero blocks of width
128 with 4 heads, the label embedder's null class trained with label dropout 0.1, T = 1000 linear,
eps-prediction with L_simple, AdamW without weight decay and no warmup, EMA. A transformer with
no convolutional prior needs a higher learning rate and more steps than the U-Net of
`ddpm_digits` at this scale. Samples use DDIM-50 with classifier-free guidance s = 2.
"""

import ml_collections

from diffusion_jax.config import base_config


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    config.data.update(name="digits", image_size=16)
    config.model = ml_collections.ConfigDict(
        dict(name="dit", patch_size=2, hidden_size=128, depth=6, num_heads=4, num_classes=10, learn_sigma=False)
    )
    config.optim.update(name="adamw", learning_rate=1e-3, warmup_steps=0, weight_decay=0.0, grad_clip_norm=1.0)
    config.training.update(
        batch_size=64, num_steps=3000, log_every=100, checkpoint_every=500, sample_every=1000,
        ema_decays=(0.995,), label_dropout=0.1,
    )
    config.sample.update(
        sampler="ddim", steps=50, eta=0.0, guidance_scale=2.0, ema_decay=0.995, num_samples=100, batch_size=100,
        png_scale=4,
    )
    config.eval.update(metrics=("digits",), num_samples=1000)
    return config
