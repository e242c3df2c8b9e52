"""Improved consistency training (iCT; Song & Dhariwal 2023, arXiv 2310.14189) on digits, no teacher.

    python -m diffusion_jax.main --config=configs/ct_digits.py --workdir=runs/ct_digits
    python -m diffusion_jax.main --config=configs/ct_digits.py --workdir=runs/ct_digits --mode=eval

`ddpm_digits`' U-Net under the consistency preconditioning, trained from scratch with iCT's choices:
the pseudo-Huber distance (c = 0.00054 √d), levels drawn from the discretised lognormal (P_mean -1.1,
P_std 2.0), the weight 1 / (σ_{n+1} - σ_n), the target network θ itself under stop_gradient (no EMA
target; the 0.995 EMA only samples), and the discretisation curriculum N(k) doubling from s0 = 10.
The paper's s1 = 1280 suits 400k steps; this run's 2000 steps take N from 11 to s1 + 1 = 81 in four
stages of 500 steps. Samples: one consistency step.
"""

import ml_collections

from diffusion_jax.config import sibling_config


def get_config() -> ml_collections.ConfigDict:
    config = sibling_config(__file__, "edm_digits")
    config.diffusion.preconditioning = "consistency"
    config.training.update(objective="consistency", num_steps=2000, checkpoint_every=500, sample_every=500,
                           ema_decays=(0.995,))
    config.consistency.update(teacher_workdir=None, curriculum="ict", s0=10, s1=80, level_sampling="lognormal",
                              p_mean=-1.1, p_std=2.0, weighting="inverse_gap", distance="pseudo_huber",
                              target_ema_decay=None)
    config.optim.update(learning_rate=5e-4, warmup_steps=200)
    config.sample.update(sampler="consistency", steps=1, ema_decay=0.995)
    config.eval.update(metrics=("digits",), num_samples=1500)
    return config
