"""EDM training (Karras et al. 2022, arXiv 2206.00364) on the embedded digits: the offline EDM config.

    python -m diffusion_jax.main --config=configs/edm_digits.py --workdir=runs/edm_digits
    python -m diffusion_jax.main --config=configs/edm_digits.py --workdir=runs/edm_digits --mode=eval

`ddpm_digits`' U-Net, data, optimiser and length, trained as EDM trains: the network is wrapped in
EDM's preconditioning (`diffusion.process='edm'`, `models.Preconditioned`: D(x; σ) = c_skip x +
c_out F(c_in x, c_noise)), σ is lognormal (P_mean -1.2, P_std 1.2) and the loss weight is
λ(σ) = (σ² + σ_data²) / (σ σ_data)² (`training.objective='edm'`, Eq. 8). Samples use EDM's
deterministic Heun sampler on the ρ = 7 grid, 18 steps = 35 NFE (Algorithm 1). It is also the
teacher of `cd_digits`.
"""

import ml_collections

from diffusion_jax.config import sibling_config


def get_config() -> ml_collections.ConfigDict:
    config = sibling_config(__file__, "ddpm_digits")
    config.training.objective = "edm"
    config.diffusion.update(process="edm", preconditioning="edm", prediction="x0", sigma_min=0.002,
                            sigma_max=80.0, sigma_data=0.5, p_mean=-1.2, p_std=1.2)
    config.sample.update(sampler="heun", steps=18, clip_x0=None)
    config.eval.metrics = ("digits",)
    return config
