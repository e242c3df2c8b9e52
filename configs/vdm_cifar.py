"""A variational diffusion model on CIFAR-10 with the settings of Kingma et al. 2021 (arXiv 2107.00630)
and of google-research/vdm's `configs/cifar10.py`.

NOT RUNNABLE OFFLINE: CIFAR-10 must be prepared once (`python -m diffusion_jax.data.prepare --dataset=cifar10`).

    python -m diffusion_jax.main --config=configs/vdm_cifar.py --workdir=runs/vdm_cifar
    python -m diffusion_jax.main --config=configs/vdm_cifar.py --workdir=runs/vdm_cifar --mode=eval

The paper's number: 2.65 bits/dim on the CIFAR-10 test set without data augmentation (Table 1 of the
first version; 2.64 in the revised one, and google-research/vdm's released checkpoint evaluates to 2.637).

Settings: the continuous-time VLB (`training.objective='vdm'`) with antithetic t, the learned monotonic γ
from γ_min -13.3 to γ_max 5.0 (`vdm.MonotonicGamma`, 1024 hidden units, App. H), Fourier features of the
input (n = 6, 7 as the released `ScoreUNet`), the 256-level softmax decoder; the score network is a U-Net
without downsampling, 32 residual blocks of 128 channels down and 33 up, attention only in the middle,
dropout 0.1, conditioned on γ_t; AdamW lr 2e-4 (β 0.9, 0.99, weight decay 0.01), 100 warm-up steps,
batch 128, 10M steps, EMA 0.9999, no flips.

What differs here: the U-Net's residual blocks are the DDPM/ADM ones (scale of the time projection,
GroupNorm of 32 groups) rather than VDM's, and the release adds the input z to ε̂ (a "base measure");
this U-Net does not. The released `cifar10.py` learns only γ's two endpoints (`learnable_scalar`); this
config learns the whole monotonic γ as the paper describes (`vdm.gamma_hidden=0` is not offered: the
shape network is always there, and at initialisation it is almost linear).
"""

import ml_collections

from diffusion_jax.config import base_config


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    config.data.update(name="cifar10", image_size=32, random_flip=False)
    config.model.update(ch=128, ch_mult=(1,), num_res_blocks=32, attn_resolutions=(), dropout=0.1, num_heads=1)
    config.diffusion.update(process="vdm", prediction="eps")
    config.vdm.update(gamma_min=-13.3, gamma_max=5.0, gamma_hidden=1024, fourier=(6, 7), decoder="discrete")
    config.optim.update(name="adamw", learning_rate=2e-4, warmup_steps=100, b1=0.9, b2=0.99, eps=1e-8,
                        weight_decay=0.01, grad_clip_norm=0.0)
    config.training.update(objective="vdm", batch_size=128, num_steps=10_000_000, ema_decays=(0.9999,),
                           checkpoint_every=10_000, sample_every=100_000)
    config.sample.update(sampler="dpm_solver++", steps=50, clip_x0=1.0, ema_decay=0.9999)
    config.eval.update(metrics=("vlb_bpd",), batch_size=128)
    return config
