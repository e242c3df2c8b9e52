"""A class-conditional U-Net on the embedded digits, sampled with classifier-free guidance.

    python -m diffusion_jax.main --config=configs/cfg_digits.py --workdir=runs/cfg_digits
    python -m diffusion_jax.main --config=configs/cfg_digits.py --workdir=runs/cfg_digits --mode=eval

`ddpm_digits` with the class label added to the time embedding (ADM's label embedding, with a
null label for the unconditional model) and trained with label dropout 0.1 (Ho & Salimans 2022,
§3.2), so one network is both the conditional and the unconditional model. Samples use DDIM-50
with guidance scale s = 2 (s = 1 + w: eps(x, null) + s (eps(x, c) - eps(x, null))); the sample grid
cycles through the classes, 0 1 2 ... 9 along each row. Eval mode reports the digits classifier's
accuracy on the requested classes with digits-FID and the IS analogue.
"""

import ml_collections

from diffusion_jax.config import base_config


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    config.data.update(name="digits", image_size=16)
    # configs/ddpm_digits.py's U-Net and schedule, with the label embedding
    config.model.update(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0, num_classes=10)
    config.optim.update(learning_rate=1e-3, warmup_steps=200)
    config.training.update(
        batch_size=64, num_steps=1500, log_every=100, checkpoint_every=500, sample_every=500, ema_decays=(0.995,)
    )
    config.sample.ema_decay = 0.995
    config.training.label_dropout = 0.1
    config.sample.update(sampler="ddim", steps=50, eta=0.0, guidance_scale=2.0, num_samples=100, batch_size=100)
    config.sample.png_scale = 4
    config.eval.metrics = ("digits",)
    config.eval.num_samples = 1000
    config.eval.batch_size = 64
    return config
