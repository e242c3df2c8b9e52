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

A run tracks them with `training.ema_sigma_rels` and writes snapshots with `training.ema_snapshot_every`
(`training.ema_snapshots`); `sample.ema_sigma_rel`, `eval.ema_sigma_rels` (a sweep) and
`diffusion_jax.load(workdir, ema_sigma_rel=...)` use the rebuilt EMAs, and this command writes them out:

    python -m diffusion_jax.posthoc_ema --workdir=runs/digits --sigma_rels=0.03,0.08,0.15 [--step=N] [--out_dir=D]

(`D/posthoc_ema-<step>-<sigma_rel>.safetensors`, one tensor per parameter path; default D: <workdir>/posthoc_ema).
"""

from collections.abc import Sequence
from pathlib import Path

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
    steps_a: np.ndarray, gammas_a: np.ndarray, steps_b: np.ndarray, gammas_b: np.ndarray, exact_steps: int = 4096
) -> np.ndarray:
    """⟨p_a, p_b⟩ for every pair of EMAs a = (t_a, γ_a), b = (t_b, γ_b), [len(a), len(b)], in float64.

    The per-step update with β_γ(t) = (1 − 1/t)^(γ+1) telescopes: θ̂_γ(t) = Σ_{k ≤ t} w_k θ_k with
    w_k = (k/t)^(γ+1) − ((k−1)/t)^(γ+1), the mass of the continuous profile p_{t,γ}(τ) = (γ + 1) τ^γ / t^(γ+1)
    on (k − 1, k] (EDM2 App. C.3 works with p itself). ⟨p_a, p_b⟩ = Σ_k w^a_k w^b_k, summed exactly over the first
    `exact_steps` steps and as the integral ∫ p_a p_b dτ beyond them, where the two agree to O((γ/k)²): so a
    run of a few dozen steps is rebuilt as exactly as one of millions (with the integral alone, the EMAs of a
    short run are off by a quarter of their distance to each other)."""
    ta, ga = (np.asarray(v, np.float64).reshape(-1, 1) for v in (steps_a, gammas_a))
    tb, gb = (np.asarray(v, np.float64).reshape(1, -1) for v in (steps_b, gammas_b))
    ea, eb = ga + 1.0, gb + 1.0
    # ∫_c^min(t_a, t_b) p_a p_b dτ = ea eb (min^(ea+eb−1) − c^(ea+eb−1)) / ((ea + eb − 1) t_a^ea t_b^eb), in logs.
    cut = np.minimum(np.minimum(ta, tb), float(exact_steps))
    scale = np.log(ea) + np.log(eb) - np.log(ea + eb - 1.0) - ea * np.log(ta) - eb * np.log(tb)
    total = np.exp(scale + (ea + eb - 1.0) * np.log(np.minimum(ta, tb)))
    head = np.exp(scale + (ea + eb - 1.0) * np.log(np.maximum(cut, 1e-300))) * (cut > 0)
    k = np.arange(1.0, min(exact_steps, float(np.minimum(ta.max(), tb.max()))) + 1.0)
    exact = np.zeros_like(total)
    for i in range(ta.shape[0]):
        wa = _step_weights(k, ta[i, 0], ga[i, 0])  # [K]
        wb = _step_weights(k[:, None], tb, gb)  # [K, len(b)]
        exact[i] = wa @ wb
    return total - head + exact


def _step_weights(k: np.ndarray, t: np.ndarray | float, gamma: np.ndarray | float) -> np.ndarray:
    """w_k = (k/t)^(γ+1) − ((k−1)/t)^(γ+1) for k ≤ t, else 0: the weight of step k's parameters in θ̂_γ(t)."""
    e = np.asarray(gamma) + 1.0
    return np.where(k <= t, (np.minimum(k, t) / t) ** e - (np.minimum(k - 1.0, t) / t) ** e, 0.0)


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


def main(argv: Sequence[str]) -> None:
    """The command above: rebuilds each σ_rel at the checkpoint step and writes it as safetensors."""
    from absl import flags, logging

    from diffusion_jax import loading
    from diffusion_jax.errors import ConfigError
    from diffusion_jax.training import ema_snapshots

    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments: {' '.join(argv[1:])}")
    flag = flags.FLAGS
    logging.set_verbosity(logging.INFO)
    out_dir = Path(flag.out_dir or Path(flag.workdir) / "posthoc_ema")
    try:
        sigma_rels = [float(s) for s in flag.sigma_rels]
    except ValueError:
        raise SystemExit(f"error: --sigma_rels: got {flag.sigma_rels}; expected floats in (0, 0.2887)") from None
    for sigma_rel in sigma_rels:
        try:
            model = loading.load(flag.workdir, step=flag.step, ema_sigma_rel=sigma_rel, field="--workdir")
        except ConfigError as e:
            raise SystemExit(f"error: {e}") from None
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"posthoc_ema-{model.step:08d}-{sigma_rel:g}.safetensors"
        ema_snapshots.save(path, jax.device_get(model.params), {"step": model.step, "sigma_rel": sigma_rel})
        logging.info("Wrote %s", path)


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("workdir", None, "A run trained with training.ema_sigma_rels and training.ema_snapshot_every.")
    flags.DEFINE_list("sigma_rels", None, "The EMA widths σ_rel to rebuild, each in (0, 0.2887).")
    flags.DEFINE_integer("step", None, "The checkpoint step (it must have snapshots); default: the newest.")
    flags.DEFINE_string("out_dir", None, "Where the .safetensors go; default: <workdir>/posthoc_ema.")
    flags.mark_flags_as_required(["workdir", "sigma_rels"])
    app.run(main)
