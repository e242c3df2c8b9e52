"""Progressive distillation (Salimans & Ho 2022, arXiv 2202.00512) of a digits model to 4 DDIM steps.

    # 1. the teacher: ddpm_digits with v-prediction on the cosine schedule (about 6 minutes)
    python -m diffusion_jax.main --config=configs/ddpm_digits.py --workdir=runs/ddpm_v_digits \\
        --config.diffusion.prediction=v --config.diffusion.schedule=cosine
    # 2. five rounds: 128 teacher DDIM steps -> students of 64, 32, 16, 8, 4 steps
    python -m diffusion_jax.main --config=configs/pd_digits.py --workdir=runs/pd_digits
    python -m diffusion_jax.main --config=configs/pd_digits.py --workdir=runs/pd_digits --mode=eval

The student is the teacher's U-Net (`ddpm_digits`' model), initialised from the teacher's EMA
weights; each round it learns to do in one DDIM step what its teacher does in two (the x-space
target of Algorithm 2, truncated-SNR weight), then becomes the next round's teacher. Following the
official configs (google-research/diffusion_distillation, config/cifar_distill.py): Adam without
EMA, the learning rate annealed linearly to 0 within each round, gradient clipping at 1, dropout 0.
Samples: deterministic DDIM on the students' own 'trailing' grid, 4 steps.
"""

import ml_collections

from diffusion_jax.config import base_config, sibling_config


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    teacher = _teacher_config()
    config.data = teacher.data
    config.model = teacher.model
    config.diffusion = teacher.diffusion
    config.training.update(
        objective="distill", batch_size=64, num_steps=2000, log_every=100, checkpoint_every=400, sample_every=400,
        ema_decays=(),
    )
    config.distill.update(teacher_workdir="runs/ddpm_v_digits", teacher_steps=128, rounds=5, steps_per_round=400)
    config.optim.update(learning_rate=2e-4, warmup_steps=0, schedule="linear", grad_clip_norm=1.0)
    config.sample.update(sampler="ddim", steps=4, spacing="trailing", eta=0.0, ema_decay=None, num_samples=64,
                         batch_size=64, png_scale=4)
    config.eval.update(metrics=("digits",), num_samples=1500)
    return config


def _teacher_config() -> ml_collections.ConfigDict:
    """`ddpm_digits` with the command line of step 1 above."""
    config = sibling_config(__file__, "ddpm_digits")
    config.diffusion.update(prediction="v", schedule="cosine")
    return config
