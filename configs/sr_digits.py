"""SR3 on digits: 16x16 digits conditioned on their 8x8 area-downsampled versions; stage 2 of a cascade.

    python -m diffusion_jax.main --config=configs/sr_digits.py --workdir=runs/sr_digits
    # super-resolve the test digits (the default low-res input), or a given image:
    python -m diffusion_jax.main --config=configs/sr_digits.py --workdir=runs/sr_digits --mode=sample
    python -m diffusion_jax.main --config=configs/sr_digits.py --workdir=runs/sr_digits --mode=sample \
        --config.sample.low_res_image=path/to/8x8.png
    # the two-stage cascade, after configs/ddpm8_digits.py: 8x8 samples, then 16x16 from them
    python -m diffusion_jax.main --config=configs/sr_digits.py --workdir=runs/sr_digits --mode=sample \
        --config.sample.low_res_workdir=runs/ddpm8_digits

`configs/ddpm_digits.py`' U-Net and its README baseline's diffusion (v-prediction, cosine schedule, L_simple,
1500 steps, ancestral sampling respaced to 100 steps), made a super-resolution model (Saharia et al. 2021,
arXiv 2104.07636): `model.low_res_size=8` concatenates the bicubically upsampled 8x8 image to x_t. Trained
with CDM's noise-conditioning augmentation (Ho et al. 2021, arXiv 2106.15282, §4.3) at levels up to
`training.low_res_noise_max`, and sampled on the clean low-res image (`sample.low_res_noise=0`); see
`diffusion_jax.super_resolution` and the README's "Super-resolution and cascades".
"""

import ml_collections

from diffusion_jax.config import sibling_config


def get_config() -> ml_collections.ConfigDict:
    config = sibling_config(__file__, "ddpm_digits")
    config.model.low_res_size = 8
    config.diffusion.prediction = "v"
    config.diffusion.schedule = "cosine"
    config.training.low_res_noise_max = 0.5
    config.sample.low_res_noise = 0.0
    config.eval.metrics = ("digits",)
    return config
