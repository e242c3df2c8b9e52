"""Rectified flow / flow matching on digits (Liu et al. 2022, arXiv 2209.03003; Lipman et al. 2022,
arXiv 2210.02747), with SD3's logit-normal times (Esser et al. 2024, arXiv 2403.03206).

    python -m diffusion_jax.main --config=configs/rf_digits.py --workdir=runs/rf_digits
    python -m diffusion_jax.main --config=configs/rf_digits.py --workdir=runs/rf_digits --mode=eval
    # reflow: pairs from the trained flow, then the 2-rectified flow started from it
    python -m diffusion_jax.reflow --workdir=runs/rf_digits --out=runs/rf_digits_pairs --num_pairs=3000 --steps=40
    python -m diffusion_jax.main --config=configs/rf_digits.py --workdir=runs/rf2_digits \\
        --config.flow.pairs_dir=runs/rf_digits_pairs --config.flow.init_workdir=runs/rf_digits

`ddpm_digits`' U-Net, data, optimiser and length, trained on x_t = (1 - t) x_0 + t ε to predict the
velocity ε - x_0 (`diffusion.process='flow'`, `training.objective='flow_matching'`; the network sees
1000 t). Samples: Euler steps uniform in t from t = 1 (DDIM on the flow's (α, σ) = (1 - t, t) view
with the 'trailing' grid is exactly the Euler step x ← x + (t' - t) u), 20 steps; every other sampler
runs on it too (`dpm_solver++`, `heun`, `ode`).
"""

import ml_collections

from diffusion_jax.config import sibling_config


def get_config() -> ml_collections.ConfigDict:
    config = sibling_config(__file__, "ddpm_digits")
    config.training.objective = "flow_matching"
    config.diffusion.update(process="flow", prediction="velocity")
    config.flow.update(t_sampling="logit_normal", logit_mean=0.0, logit_std=1.0)
    config.sample.update(sampler="ddim", steps=20, spacing="trailing", eta=0.0, clip_x0=None)
    config.eval.update(metrics=("digits",), num_samples=1500)
    return config
