"""Power-function EMA and its post-hoc reconstruction (Karras et al. 2024, EDM2, arXiv 2312.02696, §3 and App. C).

A power-function EMA of the parameters θ(τ) averages them with weights proportional to τ^γ,

    θ̂_γ(t) = (γ + 1) / t^(γ+1) ∫_0^t τ^γ θ(τ) dτ,

which as a per-step update is θ̂ ← β θ̂ + (1 − β) θ with β_γ(t) = (1 − 1/t)^(γ+1) (EDM2 Eq. 2): unlike a
constant decay, its length grows with training, so one γ suits short and long runs. Its length is given as
σ_rel, the standard deviation of the averaging profile relative to t (Eq. 3):

    σ_rel = (γ + 1)^(1/2) (γ + 2)^(−1) (γ + 3)^(−1/2).

Post hoc: snapshots of two such EMAs (EDM2 tracks σ_rel 0.05 and 0.10) saved every few thousand steps
span every other profile well enough that the EMA of any σ_rel at any snapshot time is a linear
combination of them, with coefficients from the least-squares fit of the profiles (App. C.3):
`reconstruction_weights`, then `combine`.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def gamma_from_sigma_rel(sigma_rel: float) -> float:
    """The exponent γ of a power-function EMA of relative width `sigma_rel` (0 < σ_rel < 0.2887): the largest
    real root of γ³ + 7γ² + (16 − σ_rel⁻²)γ + (12 − σ_rel⁻²) = 0, Eq. 3 squared and multiplied out."""
    if not 0.0 < sigma_rel < sigma_rel_from_gamma(0.0):
        raise ValueError(f"sigma_rel must be in (0, {sigma_rel_from_gamma(0.0):.4f}) (γ > 0), got {sigma_rel}")
    inv = 1.0 / sigma_rel**2
    roots = np.roots([1.0, 7.0, 16.0 - inv, 12.0 - inv])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


def sigma_rel_from_gamma(gamma: float) -> float:
    """σ_rel of the power-function EMA of exponent `gamma` (EDM2 Eq. 3)."""
    return float(np.sqrt(gamma + 1.0) / ((gamma + 2.0) * np.sqrt(gamma + 3.0)))


def power_beta(step: jax.Array | int, gamma: float) -> jax.Array:
    """β_γ(t) = (1 − 1/t)^(γ+1) of the update θ̂ ← β θ̂ + (1 − β) θ after step t ≥ 1 (EDM2 Eq. 2); 0 at t = 1,
    so the average starts at the first step's parameters."""
    step = jnp.asarray(step, jnp.float32)
    return jnp.exp((gamma + 1.0) * jnp.log1p(-1.0 / step))  # log1p: exact for 1/t far below float32's epsilon


def profile_inner_products(
    steps_a: np.ndarray, gammas_a: np.ndarray, steps_b: np.ndarray, gammas_b: np.ndarray
) -> np.ndarray:
    """⟨p_a, p_b⟩ = ∫ p_{t_a,γ_a}(τ) p_{t_b,γ_b}(τ) dτ for every pair, [len(a), len(b)], where
    p_{t,γ}(τ) = (γ + 1) τ^γ / t^(γ+1) on [0, t] is the averaging profile of θ̂_γ(t) (App. C.3). In closed
    form, with t_a ≤ t_b: (γ_a + 1)(γ_b + 1) (t_a / t_b)^γ_b / ((γ_a + γ_b + 1) t_b), computed in float64."""
    ta, ga = (np.asarray(v, np.float64).reshape(-1, 1) for v in (steps_a, gammas_a))
    tb, gb = (np.asarray(v, np.float64).reshape(1, -1) for v in (steps_b, gammas_b))
    ratio = np.minimum(ta, tb) / np.maximum(ta, tb)
    exponent = np.where(ta <= tb, gb, ga)  # the later profile's γ: the earlier one ends first
    return (ga + 1.0) * (gb + 1.0) * ratio**exponent / ((ga + gb + 1.0) * np.maximum(ta, tb))


def reconstruction_weights(
    snapshot_steps: Sequence[int], snapshot_gammas: Sequence[float], target_step: int, target_gamma: float
) -> np.ndarray:
    """Coefficients x [S] with Σ_i x_i θ̂_{γ_i}(t_i) ≈ θ̂_{target_gamma}(target_step): the least-squares fit of the
    target's averaging profile by the snapshots' (EDM2 App. C.3, A x = b with A_ij = ⟨p_i, p_j⟩ and
    b_i = ⟨p_i, p_target⟩; solved by least squares, since neighbouring snapshots' profiles are nearly
    collinear). Snapshots after `target_step` cannot contribute (they average later parameters) and get 0."""
    steps = np.asarray(snapshot_steps, np.float64)
    gammas = np.asarray(snapshot_gammas, np.float64)
    if steps.shape != gammas.shape or steps.ndim != 1 or not len(steps):
        raise ValueError("snapshot_steps and snapshot_gammas: one step and one γ per snapshot")
    usable = steps <= target_step
    if not usable.any():
        raise ValueError(f"target_step {target_step} precedes every snapshot (the first is at {steps.min():g})")
    weights = np.zeros(len(steps))
    a = profile_inner_products(steps[usable], gammas[usable], steps[usable], gammas[usable])
    b = profile_inner_products(steps[usable], gammas[usable], [target_step], [target_gamma])[:, 0]
    weights[usable] = np.linalg.lstsq(a, b, rcond=None)[0]
    return weights


def combine(snapshots: Sequence[object], weights: np.ndarray) -> object:
    """Σ_i weights[i] snapshots[i] for pytrees of parameters (float32 leaves, summed in float32)."""
    if len(snapshots) != len(weights):
        raise ValueError(f"{len(snapshots)} snapshots for {len(weights)} weights")
    return jax.tree.map(lambda *leaves: sum(float(w) * leaf for w, leaf in zip(weights, leaves, strict=True)),
                        *snapshots)
