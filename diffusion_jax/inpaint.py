"""Inpainting (imputation) with an unconditional model, as a transform of the denoiser.

Given known pixels y = m ⊙ x_0 (mask m, 1 where known), `conditional_denoiser` turns `model_fn` into the
denoiser of p(x_0 | x_t, y): Gaussian conditioning of x_0 | x_t on its known part, with the posterior covariance
from Tweedie's second-order formula, Cov[x_0 | x_t] = (σ_t² / α_t) ∂x̂_0/∂x_t (Efron 2011; Boys et al. 2023,
arXiv 2310.06721, "Tweedie moment projected diffusions"), so that

    E[x_0 | x_t, y] = x̂_0 + J_{·k} J_{kk}⁻¹ (y - x̂_0)_k,      J = ∂x̂_0/∂x_t,  k = the known pixels.

For Gaussian data, where x_0 | x_t is Gaussian and x̂_0 is the exact denoiser, this is the exact conditional
denoiser, so every sampler driven by it samples the exact conditional (tested against the closed form); the
known pixels of its x̂_0, and so of every sampler's output, are y exactly. J_{kk}⁻¹ r is solved by conjugate
gradients on Jacobian-vector products of the linearised denoiser (`cg_steps` of them, one JVP each), so the
cost is (1 + cg_steps) network evaluations' worth of linearised work per call and nothing is materialised.

score_sde's imputation (Song et al. 2021, App. I.2: replace the known part of x_t by a forward-noised copy of y
at every step) is the cheaper approximation this replaces: it conditions the unknown pixels on a noisy copy of
y rather than on y, which on a 2-D Gaussian of correlation 0.9 puts the conditional mean at 0.93 instead of
1.35 (this module's notes in the README).
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from diffusion_jax import diffusion, inverse


def conditional_denoiser(
    model_fn: diffusion.ModelFn, process: Any, prediction: str, known: jax.Array, mask: jax.Array,
    cg_steps: int = 8,
) -> diffusion.ModelFn:
    """`model_fn(x_t, t)` of the same `prediction` kind, denoising towards E[x_0 | x_t, m ⊙ x_0 = m ⊙ known]:
    `inverse.posterior_denoiser`'s 'tweedie' method for the noiseless mask, with the known part of x̂_0 set to
    `known` (which the solve already gives, up to its accuracy).

    Args:
        model_fn: the unconditional denoiser, `model_fn(x_t, t)`.
        process: gives (α_t, σ_t) at model time t (`alpha_sigma(t)`): the training schedule of a discrete
            model, or a continuous process.
        prediction: what `model_fn` predicts ('eps' | 'x0' | 'v' | 'velocity').
        known: [B, ...] (or broadcastable) the image whose masked pixels are known.
        mask: [B, ...] (or broadcastable) 1 where `known` is known, 0 elsewhere.
        cg_steps: conjugate-gradient iterations for J_kk⁻¹ r (exact after as many as there are known pixels;
            J_kk is symmetric positive definite for the exact denoiser, nearly so for a trained one).
    """

    def conditioned(denoise: Callable[[jax.Array], jax.Array], x_t: jax.Array, alpha: jax.Array,
                    sigma: jax.Array) -> jax.Array:
        m = jnp.broadcast_to(mask, x_t.shape).astype(x_t.dtype)
        y = jnp.broadcast_to(known, x_t.shape).astype(x_t.dtype)
        x0 = inverse.x0_correction(inverse.mask(m), m * y, 0.0, "tweedie", 1.0, cg_steps)(denoise, x_t, alpha, sigma)
        return m * y + (1.0 - m) * x0

    return diffusion.with_x0(model_fn, process, prediction, conditioned)
