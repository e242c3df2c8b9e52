"""Consistency distillation on CIFAR-10 with Song et al. 2023's settings (arXiv 2303.01469, §6, Table 3, App. C).

NOT RUNNABLE OFFLINE: it needs CIFAR-10 prepared (`python -m diffusion_jax.data.prepare --dataset=cifar10`) and
an EDM teacher trained with `configs/edm_cifar.py` in `runs/edm_cifar` (the paper distils EDM's own model).

    python -m diffusion_jax.main --config=configs/cd_cifar.py --workdir=runs/cd_cifar

The paper's CIFAR-10 results: CD with LPIPS, FID 3.55 in one step and 2.93 in two. The distance
here is the squared L2: LPIPS needs VGG weights this repository does not ship ('pseudo_huber' is
iCT's replacement for it), so expect a worse FID than the paper's.

Settings: N = 18 Karras levels (σ in [0.002, 80], ρ = 7), the teacher's Heun step, the target EMA
μ = 0.95, the student initialised from the teacher (our U-Net of `edm_cifar`, so the weights carry
over), Adam lr 4e-4 without warmup, batch 512, 800k steps, EMA 0.9999 for sampling. Samples: one
consistency step (two: `--config.sample.steps=2`, or chosen σ with `--config.sample.sigmas`).
"""

import ml_collections

from diffusion_jax.config import sibling_config


def get_config() -> ml_collections.ConfigDict:
    config = sibling_config(__file__, "edm_cifar")
    config.model.dropout = 0.0
    config.diffusion.preconditioning = "consistency"
    config.training.update(objective="consistency", batch_size=512, num_steps=800_000, ema_decays=(0.95, 0.9999))
    config.consistency.update(teacher_workdir="runs/edm_cifar", num_levels=18, curriculum="fixed",
                              level_sampling="uniform", weighting="uniform", distance="l2", target_ema_decay=0.95)
    config.optim.update(learning_rate=4e-4, warmup_steps=0)
    config.sample.update(sampler="consistency", steps=1, ema_decay=0.9999)
    return config
