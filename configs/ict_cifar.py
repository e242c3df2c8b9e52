"""Improved consistency training on CIFAR-10 (Song & Dhariwal 2023, arXiv 2310.14189, §3-4, Table 2).

NOT RUNNABLE OFFLINE: CIFAR-10 must be prepared once (`python -m diffusion_jax.data.prepare --dataset=cifar10`).

    python -m diffusion_jax.main --config=configs/ict_cifar.py --workdir=runs/ict_cifar

The paper's CIFAR-10 results: FID 2.83 in one step and 2.46 in two (Table 2, iCT).

Settings: no teacher and no EMA target (θ⁻ = stop_gradient(θ)); the pseudo-Huber distance with
c = 0.00054 √d; levels from the discretised lognormal (P_mean -1.1, P_std 2.0); the weight
1 / (σ_{n+1} - σ_n); the curriculum N(k) = min(s0 2^⌊k / K'⌋, s1) + 1 with s0 = 10, s1 = 1280;
σ in [0.002, 80], ρ = 7, σ_data 0.5; dropout 0.3; Adam, lr 1e-4, batch 1024, 400k steps; EMA
0.99993 for sampling.

What differs here: iCT's network is NCSN++ with Fourier time features; ours is the U-Net of
`edm_cifar` with the sinusoidal embedding of c_noise = 250 ln σ.
"""

import ml_collections

from diffusion_jax.config import sibling_config


def get_config() -> ml_collections.ConfigDict:
    config = sibling_config(__file__, "edm_cifar")
    config.model.dropout = 0.3
    config.diffusion.preconditioning = "consistency"
    config.training.update(objective="consistency", batch_size=1024, num_steps=400_000, ema_decays=(0.99993,))
    config.consistency.update(teacher_workdir=None, curriculum="ict", s0=10, s1=1280, level_sampling="lognormal",
                              p_mean=-1.1, p_std=2.0, weighting="inverse_gap", distance="pseudo_huber",
                              target_ema_decay=None)
    config.optim.update(learning_rate=1e-4, warmup_steps=0)
    config.sample.update(sampler="consistency", steps=1, ema_decay=0.99993)
    return config
