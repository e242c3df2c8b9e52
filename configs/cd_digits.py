"""Consistency distillation (Song et al. 2023, arXiv 2303.01469, Algorithm 2) of `edm_digits`.

    # 1. the teacher: EDM training on digits (about 7 minutes)
    python -m diffusion_jax.main --config=configs/edm_digits.py --workdir=runs/edm_digits
    # 2. distil it into a consistency model, sampled in 1 step
    python -m diffusion_jax.main --config=configs/cd_digits.py --workdir=runs/cd_digits
    python -m diffusion_jax.main --config=configs/cd_digits.py --workdir=runs/cd_digits --mode=eval
    python -m diffusion_jax.main --config=configs/cd_digits.py --workdir=runs/cd_digits --mode=eval \\
        --config.sample.steps=2

The student is the teacher's U-Net under the consistency preconditioning (f(x, σ_min) = x exactly),
initialised from the teacher's EMA weights. Each step draws a level n of the N = 18 Karras grid
(σ in [0.002, 80], ρ = 7), noises the data to σ_{n+1}, takes one Heun step of the teacher's
probability-flow ODE to σ_n, and pulls f_θ(x_{σ_{n+1}}) towards the target network f_θ⁻(x̂_{σ_n})
with the squared L2 distance (LPIPS, the paper's CIFAR choice, needs weights this repository does not
ship). θ⁻ is the EMA of decay μ = 0.95 (the paper's CIFAR value), kept as one of `training.ema_decays`,
so it is checkpointed and resumed with the run; samples use the 0.995 EMA.
"""

import ml_collections

from diffusion_jax.config import sibling_config


def get_config() -> ml_collections.ConfigDict:
    config = sibling_config(__file__, "edm_digits")
    config.diffusion.preconditioning = "consistency"
    config.training.update(objective="consistency", num_steps=1000, checkpoint_every=250, sample_every=500,
                           ema_decays=(0.95, 0.995))
    config.consistency.update(teacher_workdir="runs/edm_digits", num_levels=18, curriculum="fixed",
                              level_sampling="uniform", weighting="uniform", distance="l2", target_ema_decay=0.95)
    config.optim.update(learning_rate=2e-4, warmup_steps=0, schedule="constant")
    config.sample.update(sampler="consistency", steps=1, ema_decay=0.995)
    config.eval.update(metrics=("digits",), num_samples=1500)
    return config
