"""A variational diffusion model (Kingma et al. 2021, arXiv 2107.00630) on the embedded digits: the offline
VDM config.

    python -m diffusion_jax.main --config=configs/vdm_digits.py --workdir=runs/vdm_digits
    python -m diffusion_jax.main --config=configs/vdm_digits.py --workdir=runs/vdm_digits --mode=eval

`ddpm_digits`' U-Net, data, optimiser and length, trained on VDM's continuous-time VLB in bits/dim
(`training.objective='vdm'`): the schedule is learned (`diffusion.process='vdm'`: a monotonic γ network
from γ_min -13.3 to γ_max 5.0, its endpoints on the VLB, its shape on the VLB's variance), t is antithetic,
the network sees the input's Fourier features and is conditioned on γ_t (`models.VDMNetwork`), and the
decoder is the 256-level softmax of 8-bit pixels. Eval mode reports that VLB on the 297 test digits
(`vlb_bpd`, with its prior, decoder and diffusion parts) and digits-FID of 1,500 samples drawn by
DPM-Solver++ on the learned schedule (20 steps); every other sampler runs on it too.
"""

import ml_collections

from diffusion_jax.config import sibling_config


def get_config() -> ml_collections.ConfigDict:
    config = sibling_config(__file__, "ddpm_digits")
    config.training.objective = "vdm"
    config.diffusion.update(process="vdm", prediction="eps")
    config.vdm.update(gamma_min=-13.3, gamma_max=5.0, gamma_hidden=1024, fourier=(6, 7), decoder="discrete")
    config.sample.update(sampler="dpm_solver++", steps=20, clip_x0=1.0)
    config.eval.update(metrics=("vlb_bpd", "digits"), num_samples=1500)
    return config
