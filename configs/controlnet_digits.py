"""ControlNet (Zhang, Rao & Agrawala 2023, arXiv 2302.05543) on the digits U-Net: follow a coarse mask.

    # 1. the base: ddpm_digits with v-prediction on the cosine schedule (about 6 minutes)
    python -m diffusion_jax.main --config=configs/ddpm_digits.py --workdir=runs/ddpm_v_digits \\
        --config.diffusion.prediction=v --config.diffusion.schedule=cosine
    # 2. the ControlNet, then how well its samples follow test-split masks (IoU) against the base's (chance)
    python -m diffusion_jax.main --config=configs/controlnet_digits.py --workdir=runs/controlnet_digits
    python -m diffusion_jax.controlnet --workdir=runs/controlnet_digits --num=256

The base's U-Net stays frozen; a copy of its encoder (initialised from the base's EMA weights) with a hint
encoder and zero convolutions learns to steer it towards the digit's coarse mask (8x8 cells, thresholded;
`controlnet.control='mask'`, or 'edges'), made from each training image. Adam at 5e-4 on the copy only
(`models.controlnet`), batch 32, 1600 steps, EMA 0.995; DDIM-50 samples for the test split's masks.
"""

import ml_collections

from diffusion_jax.config import base_config, sibling_config


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    base = sibling_config(__file__, "ddpm_digits")
    base.diffusion.update(prediction="v", schedule="cosine")  # runs/ddpm_v_digits, step 1 above
    config.data = base.data
    config.model = base.model
    config.diffusion = base.diffusion
    config.model.name = "controlnet_unet"
    config.model.hint_channels = 16
    config.controlnet.update(base_workdir="runs/ddpm_v_digits", control="mask")
    config.optim.update(learning_rate=5e-4, warmup_steps=100)
    config.training.update(batch_size=32, num_steps=1600, log_every=100, checkpoint_every=400, sample_every=800,
                           ema_decays=(0.995,))
    config.sample.update(sampler="ddim", steps=50, eta=0.0, ema_decay=0.995, num_samples=64, batch_size=64,
                         png_scale=4)
    config.eval.update(metrics=("digits",), num_samples=1500)
    return config
