"""DDPM on CIFAR-10 with Ho et al. 2020's settings (arXiv 2006.11239, §4 and Appendix B).

    python -m diffusion_jax.main --config=configs/ddpm_cifar.py --workdir=runs/ddpm_cifar

T = 1000, linear betas 1e-4 -> 0.02, eps-prediction with L_simple; the 35.7M-parameter
U-Net (ch 128, multipliers (1, 2, 2, 2), 2 res blocks, self-attention at 16x16, dropout
0.1); Adam, lr 2e-4 with 5000 warmup steps, batch 128, gradient clipping at norm 1, EMA
0.9999, random horizontal flips, 800k steps. Samples use the full 1000-step ancestral
sampler with fixed-small variance (beta-tilde), as in the paper's Table 1.

The paper reports FID 3.17, IS 9.46 and NLL <= 3.75 bits/dim (Table 1). CIFAR-10 must be
prepared once (needs TensorFlow for the image encoding; reading does not):
    pip install 'diffusion-jax[tf]' && python -m diffusion_jax.data.prepare --dataset=cifar10
"""

import ml_collections

from diffusion_jax.config import base_config


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    config.data.name = "cifar10"
    config.data.image_size = 32
    config.data.random_flip = True
    # config.model: base_config's defaults are Ho et al.'s CIFAR-10 U-Net.
    config.diffusion.schedule = "linear"
    config.diffusion.num_timesteps = 1000
    config.diffusion.prediction = "eps"
    config.optim.name = "adam"
    config.optim.learning_rate = 2e-4
    config.optim.warmup_steps = 5000
    config.optim.grad_clip_norm = 1.0
    config.training.batch_size = 128
    config.training.num_steps = 800_000
    config.training.ema_decays = (0.9999,)
    config.training.checkpoint_every = 10_000
    config.training.sample_every = 50_000
    config.sample.sampler = "ddpm"
    config.sample.variance = "fixed_small"
    config.sample.ema_decay = 0.9999
    # FID / IS need the FID Inception weights: --config.eval.inception_weights=<path> (see the README).
    config.eval.metrics = ("vlb_bpd", "fid", "inception_score")
    config.eval.num_samples = 50_000
    return config
