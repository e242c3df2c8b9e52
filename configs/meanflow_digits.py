"""MeanFlow on digits (Geng et al. 2025, arXiv 2505.13447): the average velocity u(z_t, r, t) of the flow, trained
from scratch for one-step generation, with the paper's CIFAR-10 choices (App. A: (t, r) logit-normal(-2, 2), 75%
of the examples with r < t, adaptive weight power 0.75).

    python -m diffusion_jax.main --config=configs/meanflow_digits.py --workdir=runs/meanflow_digits
    python -m diffusion_jax.main --config=configs/meanflow_digits.py --workdir=runs/meanflow_digits --mode=eval
    # two jumps, or the instantaneous velocity (r = t) under 20 Euler steps:
    python -m diffusion_jax.main --config=configs/meanflow_digits.py --workdir=runs/meanflow_digits --mode=eval \\
        --config.sample.steps=2
    python -m diffusion_jax.main --config=configs/meanflow_digits.py --workdir=runs/meanflow_digits --mode=eval \\
        --config.sample.sampler=ddim --config.sample.steps=20 --config.sample.spacing=trailing

`ddpm_digits`' U-Net (with the interval t - r embedded beside t), data and optimiser on x_t = (1 - t) x_0 + t ε,
for 2000 steps: the length of `ct_digits`, the consistency-training run it is compared with at one step.
"""

import ml_collections

from diffusion_jax.config import sibling_config


def get_config() -> ml_collections.ConfigDict:
    config = sibling_config(__file__, "ddpm_digits")
    config.training.update(objective="meanflow", num_steps=2000, checkpoint_every=500, sample_every=500)
    config.diffusion.update(process="flow", prediction="velocity")
    config.flow.update(t_sampling="logit_normal", logit_mean=-2.0, logit_std=2.0)
    config.meanflow.update(interval_ratio=0.75, adaptive_p=0.75, adaptive_c=1e-3)
    config.sample.update(sampler="meanflow", steps=1, clip_x0=None)
    config.eval.update(metrics=("digits",), num_samples=1500)
    return config
