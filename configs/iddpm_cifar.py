"""Improved DDPM on CIFAR-10 with Nichol & Dhariwal 2021's settings (arXiv 2102.09672, §3 and Appendix A;
their `improved-diffusion` README's CIFAR-10 flags).

    python -m diffusion_jax.main --config=configs/iddpm_cifar.py --workdir=runs/iddpm_cifar
    python -m diffusion_jax.main --config=configs/iddpm_cifar.py --workdir=runs/iddpm_cifar --mode=eval

T = 4000 with the cosine schedule (their Eq. 17); eps-prediction with the learned variance
Sigma = exp(v log beta_t + (1 - v) log beta-tilde_t) (Eq. 15), trained with L_hybrid =
L_simple + 0.001 L_vlb (§3.1); the U-Net of ch 128, multipliers (1, 2, 2, 2), 3 res blocks,
attention at 16x16 and 8x8 with 4 heads, scale-shift norm (FiLM), dropout 0.3; Adam, lr 1e-4,
batch 128, no warmup and no gradient clipping (their code has neither), EMA 0.9999, 500k steps.
Samples use the ancestral sampler with the learned variance over all 4000 steps; with the
learned variance, `--config.sample.steps=100` loses little (§4).

Expected numbers: the paper's CIFAR-10 likelihood is NLL 2.94 bits/dim on the test set
(Table 2, the VLB with all T terms and the discretised decoder, as `--mode=eval` computes with
`eval.metrics=('vlb_bpd',)`). Their best likelihoods come from L_vlb with importance-sampled
timesteps (`--config.diffusion.loss=vlb --config.diffusion.timestep_sampling=importance`, §3.3),
their best FIDs from L_hybrid, the default here; FID is measured on 50k samples against the
training set's Inception statistics (see the README's evaluation protocol).
"""

import ml_collections

from diffusion_jax.config import base_config


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    config.data.name = "cifar10"
    config.data.image_size = 32
    config.data.random_flip = True
    config.model.update(
        ch=128,
        ch_mult=(1, 2, 2, 2),
        num_res_blocks=3,
        attn_resolutions=(16, 8),
        num_heads=4,
        dropout=0.3,
        use_scale_shift_norm=True,
        learn_sigma=True,
    )
    config.diffusion.update(
        schedule="cosine", num_timesteps=4000, prediction="eps", loss="hybrid", vlb_weight=0.001,
        timestep_sampling="uniform",
    )
    config.optim.update(name="adam", learning_rate=1e-4, warmup_steps=0, grad_clip_norm=0.0)
    config.training.update(
        batch_size=128, num_steps=500_000, ema_decays=(0.9999,), checkpoint_every=10_000, sample_every=50_000
    )
    config.sample.update(sampler="ddpm", variance="learned_range", ema_decay=0.9999)
    # FID / IS need the FID Inception weights: --config.eval.inception_weights=<path> (see the README).
    config.eval.metrics = ("vlb_bpd", "fid", "inception_score")
    config.eval.num_samples = 50_000
    return config
