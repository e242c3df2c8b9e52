"""EDM training on CIFAR-10 with Karras et al. 2022's DDPM++ settings (arXiv 2206.00364, Table 7, App. F).

NOT RUNNABLE OFFLINE: CIFAR-10 must be prepared once (`python -m diffusion_jax.data.prepare --dataset=cifar10`).

    python -m diffusion_jax.main --config=configs/edm_cifar.py --workdir=runs/edm_cifar
    python -m diffusion_jax.main --config=configs/edm_cifar.py --workdir=runs/edm_cifar \\
        --config.model.num_classes=10   # the class-conditional model

The paper's CIFAR-10 32x32 results with these settings (abstract; 35 NFE of the deterministic Heun
sampler): FID 1.97 unconditional and 1.79 class-conditional. (The issue that asked
for this config quotes 1.97 cond. / 2.04 uncond.; the paper's abstract gives the numbers above.)

Settings (EDM's `train.py --arch=ddpmpp --precond=edm`): the preconditioned denoiser with σ_data 0.5,
lognormal σ (P_mean -1.2, P_std 1.2), λ(σ) = (σ² + σ_data²) / (σ σ_data)²; DDPM++'s U-Net at 128
channels, multipliers (2, 2, 2), 4 residual blocks per resolution, attention at 16x16, dropout 0.13,
residual up/downsampling, additive (not scale-shift) time embedding; Adam lr 1e-3 (β 0.9, 0.999,
ε 1e-8) warmed up over 10 Mimg (19,531 steps at batch 512), no gradient clipping, 200 Mimg (390,625
steps), EMA with a 0.5 Mimg half-life (0.5^(512 / 500,000) = 0.99929 per step). Sampling: Heun on
the ρ = 7 grid, 18 steps.

What differs here: EDM's DDPM++ is score_sde's architecture (FIR-free [1, 1] resampling, skip
rescaling by 1/√2), ours is the DDPM/ADM U-Net with those widths; EDM's non-leaking augmentation pipe
(probability 0.12, with the augmentation labels as an extra condition) is replaced by horizontal flips.
"""

import ml_collections

from diffusion_jax.config import base_config


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    config.data.update(name="cifar10", image_size=32, random_flip=True)
    config.model.update(ch=128, ch_mult=(2, 2, 2), num_res_blocks=4, attn_resolutions=(16,), dropout=0.13,
                        num_heads=1, use_scale_shift_norm=False, resblock_updown=True)
    config.diffusion.update(process="edm", preconditioning="edm", prediction="x0", sigma_min=0.002,
                            sigma_max=80.0, sigma_data=0.5, p_mean=-1.2, p_std=1.2)
    config.optim.update(name="adam", learning_rate=1e-3, warmup_steps=19_531, b1=0.9, b2=0.999, eps=1e-8,
                        grad_clip_norm=0.0)
    config.training.update(objective="edm", batch_size=512, num_steps=390_625, ema_decays=(0.99929,),
                           checkpoint_every=10_000, sample_every=50_000)
    config.sample.update(sampler="heun", steps=18, clip_x0=None, ema_decay=0.99929)
    # FID needs the FID Inception weights: --config.eval.inception_weights=<path> (see the README).
    config.eval.update(metrics=("fid",), num_samples=50_000)
    return config
