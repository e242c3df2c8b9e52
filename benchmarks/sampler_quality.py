"""Sampler quality against exact samples, for Gaussian mixtures whose denoiser is closed form.

Every sampler is driven by `exact.x0_model` (the exact E[x_0 | x_t], prediction='x0'), so the
only error left is the sampler's discretisation. For each (sampler, NFE) it measures, on
N samples against an independent set of N exact samples and the mixture's closed-form moments:

  - SW: sliced 2-Wasserstein distance (`exact.sliced_wasserstein`, 256 projections); the
    floor is the SW between two independent exact sets (what a perfect sampler would score);
  - mean error |mean - mu|_2 and covariance error |cov - Sigma|_F;
  - off-mode (2-D ring only): the share of samples farther than 4 std from every mode centre
    (0.03% of exact samples).

Data: (a) `exact.ring(8, radius=1, std=0.05)`, sharply multimodal; (b) 16 components in 64-D,
std 0.3, means N(0, I) scaled so that two means are SEP_64D = 5 component std apart on average
(moderate overlap: 77% of exact samples have a component posterior above 0.9).

NFE: each row maps a target NFE to the `steps` whose NFE formula (2 levels - 1 for Heun, ...),
applied to the noise levels those steps give, comes closest (the fewer steps on a tie); on the
discrete schedule 'logsnr' and 'karras' round levels to training timesteps and drop repeats, so
1000 steps give 734 / 765 levels. Every cell reports the sampler's own `info.nfe`, in brackets
where it differs from the column. Samplers run on `schedules.linear(1000)` (x_T ~ N(0, I)) unless
their row names a continuous process of `diffusion_jax.sde` (x_T from its `prior_sample`). A row
whose sampler is not registered is skipped with a note: adding a sampler is one entry in ROWS.
Each (row, steps) is one `jax.jit` of the whole chain; timings in the .jsonl include compilation.

    python benchmarks/sampler_quality.py            # full run: tables to stdout and benchmarks/results/
    python benchmarks/sampler_quality.py --quick    # 2000 / 1000 samples, NFE 5, 10, 50; prints only
"""

import argparse
import dataclasses
import functools
import inspect
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

import diffusion_jax as dj
from diffusion_jax import exact, sde
from diffusion_jax.samplers.levels import noise_levels

RESULTS = Path(__file__).parent / "results" / "sampler_quality.md"
NFE_GRID = (5, 10, 20, 50, 100, 1000)
QUICK_NFE_GRID = (5, 10, 50)
FLOOR_PAIRS = 5  # independent exact sets the SW floor is taken over
SEP_64D = 5.0  # mean pairwise distance of the 64-D means, in component std
OFF_MODE_STD = 4.0
PROCESSES: dict[str, Any] = {"linear": dj.schedules.linear(1000), "vp": sde.VPSDE(), "ve": sde.VESDE()}


@dataclasses.dataclass(frozen=True)
class Row:
    """One sampler configuration: a table row."""

    label: str
    sampler: str  # name in dj.samplers
    process: str = "linear"  # key of PROCESSES
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    nfe: Callable[[int], int] = lambda levels: levels  # the documented NFE of a chain over `levels` noise levels


ROWS = (
    Row("ddpm (ancestral, linspace)", "ddpm"),
    Row("ddim η=0 (uniform)", "ddim", options={"eta": 0.0}),
    Row("dpm_solver++ 2M (logsnr)", "dpm_solver++", options={"order": 2}),
    Row("dpm_solver++ 3M (logsnr)", "dpm_solver++", options={"order": 3}),
    Row("euler (karras)", "euler"),
    Row("heun (karras)", "heun", nfe=lambda levels: 2 * levels - 1),
    Row("pc, VP (1 corrector)", "pc", "vp", {"n_corrector": 1}, nfe=lambda levels: 2 * levels),
    # 2 per level, + 1 for the final Tweedie denoising step (denoise_final=True).
    Row("langevin, VE (2 per level)", "langevin", "ve", {"n_steps_each": 2}, nfe=lambda levels: 2 * levels + 1),
)

# DPM-Solver++(2M) at 10 NFE: the settings libraries ship against ours, each without and with the
# step-ratio guard (max_step_ratio: first order after a step > 2x longer in log-SNR than the one
# before). diffusers' DPMSolverMultistepScheduler defaults to timestep_spacing='linspace', which
# drops t=0 and steps from t=100 straight to sigma=0: our 'trailing', to one timestep. Our
# 'linspace' (iDDPM's) and 'uniform' (DDIM's; diffusers' 'leading' without its t=0 drop) keep t=0
# as a level, so their second-last step is ~5x longer in log-SNR than the one before it.
BEFORE_AFTER = tuple(
    Row(
        f"2M, {label}, " + (f"guard {ratio:g}" if ratio else "no guard"),
        "dpm_solver++",
        options={"spacing": spacing, "max_step_ratio": ratio},
    )
    for spacing, label in (
        ("linspace", "linspace (iDDPM; keeps t=0)"),
        ("uniform", "uniform (DDIM; keeps t=0)"),
        ("trailing", "trailing (≈ diffusers' default)"),
        ("logsnr", "logsnr (ours)"),
    )
    for ratio in (None, 2.0)
) + (
    Row("ddim (first order), linspace", "ddim", options={"spacing": "linspace"}),
    Row("ddim (first order), trailing", "ddim", options={"spacing": "trailing"}),
)
DPM_OPTIONS_IN_TABLE = {
    "order",
    "spacing",
    "lower_order_final",
    "max_step_ratio",
    "clip_x0",
    "return_info",
    "return_trajectory",
}
ODE_TOLERANCES = (1e-2, 1e-3, 1e-4, 1e-5)  # rtol = atol; the 'ode' sampler on the VP SDE


@dataclasses.dataclass(frozen=True)
class Dataset:
    name: str
    mixture: exact.GaussianMixture
    n: int
    off_mode: bool  # report the share of samples away from every mode (meaningful for narrow modes in 2-D)


def mixture_64d(num_components: int = 16, dim: int = 64, std: float = 0.3) -> exact.GaussianMixture:
    """Equal-weight components with means N(0, I) scaled to SEP_64D std apart on average (seed 0)."""
    means = np.random.default_rng(0).standard_normal((num_components, dim)) * SEP_64D * std / math.sqrt(2 * dim)
    return exact.GaussianMixture(means, std, np.full(num_components, 1.0 / num_components))


def moments(mixture: exact.GaussianMixture) -> tuple[np.ndarray, np.ndarray]:
    """Closed-form mean [D] and covariance [D, D] of the mixture."""
    mean = mixture.weights @ mixture.means
    centred = mixture.means - mean
    cov = (centred.T * mixture.weights) @ centred + mixture.std**2 * np.eye(mixture.means.shape[1])
    return mean, cov


def metrics(x: np.ndarray, reference: np.ndarray, data: Dataset) -> dict[str, float]:
    """SW to `reference`, mean and covariance errors against closed form, and the off-mode share."""
    if not np.all(np.isfinite(x)):
        return {"sw": math.nan, "mean_err": math.nan, "cov_err": math.nan, "off_mode": math.nan}
    mean, cov = moments(data.mixture)
    out = {
        "sw": exact.sliced_wasserstein(x, reference),
        "mean_err": float(np.linalg.norm(x.mean(0) - mean)),
        "cov_err": float(np.linalg.norm(np.cov(x, rowvar=False) - cov)),
    }
    if data.off_mode:
        dist = np.linalg.norm(x[:, None, :] - data.mixture.means[None], axis=-1).min(axis=1)
        out["off_mode"] = float(np.mean(dist > OFF_MODE_STD * data.mixture.std))
    return out


def num_levels(row: Row, steps: int) -> int:
    """The noise levels `steps` gives the row's sampler: fewer than `steps` where a spacing on the
    discrete schedule rounds two levels to one training timestep ('logsnr', 'karras')."""
    spacing = row.options.get("spacing", inspect.signature(dj.samplers.get(row.sampler)).parameters["spacing"].default)
    return noise_levels(PROCESSES[row.process], steps, spacing).num


def steps_for(row: Row, target: int) -> int:
    """The steps whose NFE (the row's formula on the levels they give) is closest to `target`, the
    fewer on a tie: a bisection for the fewest steps reaching `target`, then that or one less."""
    nfe = functools.cache(lambda steps: row.nfe(num_levels(row, steps)))
    lo, hi = 1, PROCESSES[row.process].num_timesteps if row.process == "linear" else 10 * target
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if nfe(mid) >= target else (mid + 1, hi)
    return min({max(lo - 1, 1), lo}, key=lambda steps: (abs(nfe(steps) - target), steps))


def run(row: Row, data: Dataset, reference: np.ndarray, options: dict[str, Any]) -> dict[str, Any]:
    """One jitted sampler call on `data.n` samples; returns its metrics, NFE and wall time."""
    process = PROCESSES[row.process]
    key = jax.random.key(1)
    shape = (data.n, data.mixture.means.shape[1])
    x_T = process.prior_sample(key, shape) if isinstance(process, sde.Process) else jax.random.normal(key, shape)
    sample = functools.partial(
        dj.samplers.get(row.sampler),
        exact.x0_model(data.mixture, process),
        process,
        prediction="x0",
        return_info=True,
        **row.options,
        **options,
    )
    start = time.perf_counter()
    x, info = jax.jit(sample)(jax.random.key(2), x_T)
    x = np.asarray(x)
    return {"nfe": int(info.nfe), "seconds": time.perf_counter() - start, **metrics(x, reference, data)}


def attempt(row: Row, data: Dataset, reference: np.ndarray, notes: list[str], **options: Any) -> dict[str, Any] | None:
    """`run`, or None with a note if the sampler is missing or fails."""
    if row.sampler not in dj.samplers.names():
        note = f"`{row.sampler}` is not registered: row '{row.label}' skipped."
        if note not in notes:
            notes.append(note)
        return None
    try:
        return run(row, data, reference, options)
    except Exception as e:  # a failing sampler is a finding, not a crash
        notes.append(f"{data.name}, {row.label}, {options}: {type(e).__name__}: {str(e).splitlines()[0]}")
        return None


def fmt(value: float, percent: bool = False) -> str:
    if math.isnan(value):
        return "nan"
    if percent:
        return f"{100 * value:.1f}%" if value >= 1e-3 else f"{100 * value:.2f}%"
    return f"{value:.3f}"


def moment_cell(r: dict[str, Any]) -> str:
    return f"{fmt(r['mean_err'])} / {fmt(r['cov_err'])}"


def markdown(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


Results = dict[tuple[str, str, Any], dict[str, Any] | None]  # (dataset, row label, target NFE or tol) -> run


def evaluate(data: Dataset, grid: tuple[int, ...], tolerances: tuple[float, ...], notes: list[str]) -> Results:
    """Every row of ROWS at every target NFE, BEFORE_AFTER at 10 NFE and 'ode' at each tolerance."""
    reference = data.mixture.sample(np.random.default_rng(0), data.n)
    results: Results = {}
    for row in ROWS:
        for target in grid:
            steps = steps_for(row, target)
            r = results[data.name, row.label, target] = attempt(row, data, reference, notes, steps=steps)
            if r is None:
                break
            r["steps"] = steps
            expected = row.nfe(num_levels(row, steps))
            if r["nfe"] != expected:
                notes.append(f"{data.name}, {row.label}: steps={steps} gave NFE {r['nfe']}; formula: {expected}")
            print(f"{data.name:5s} {row.label:32s} NFE {r['nfe']:5d}  SW {r['sw']:.4f}  {r['seconds']:5.1f}s")
    for row in BEFORE_AFTER:
        results[data.name, row.label, 10] = attempt(row, data, reference, notes, steps=10)
    for tol in tolerances:
        results[data.name, "ode", tol] = attempt(Row("ode", "ode", "vp"), data, reference, notes, rtol=tol, atol=tol)
    return results


def floor(data: Dataset) -> dict[str, float]:
    """Each metric for FLOOR_PAIRS independent exact sets against the reference: median, and min/max of SW."""
    reference = data.mixture.sample(np.random.default_rng(0), data.n)
    sets = [data.mixture.sample(np.random.default_rng(seed), data.n) for seed in range(1, FLOOR_PAIRS + 1)]
    runs = [metrics(x, reference, data) for x in sets]
    out = {k: float(np.median([r[k] for r in runs])) for k in runs[0]}
    return {**out, "sw_min": min(r["sw"] for r in runs), "sw_max": max(r["sw"] for r in runs)}


def dataset_section(data: Dataset, title: str, results: Results, grid: tuple[int, ...], notes: list[str]) -> list[str]:
    """Floor line, then SW, off-mode and moment tables (rows: samplers; columns: target NFE)."""
    ref = floor(data)
    text = f"SW {fmt(ref['sw'])} ({fmt(ref['sw_min'])}–{fmt(ref['sw_max'])}), mean err {fmt(ref['mean_err'])}, "
    text += f"cov err {fmt(ref['cov_err'])}" + (f", off-mode {fmt(ref['off_mode'], True)}" if data.off_mode else "")
    lines = ["", f"## {title} (N = {data.n})", "", f"Floor (median of {FLOOR_PAIRS} independent exact sets): {text}."]
    shown: list[tuple[str, Callable[[dict[str, Any]], str]]] = [("Sliced Wasserstein", lambda r: fmt(r["sw"]))]
    if data.off_mode:
        shown.append(("Off-mode share", lambda r: fmt(r["off_mode"], percent=True)))
    shown.append(("Mean error / covariance error", moment_cell))
    for name, cell in shown:
        body = []
        for row in ROWS:
            runs = [results.get((data.name, row.label, target)) for target in grid]
            if any(runs):
                body.append(
                    [row.label]
                    + [
                        "—" if r is None else cell(r) + ("" if r["nfe"] == target else f" [{r['nfe']}]")
                        for r, target in zip(runs, grid, strict=True)
                    ]
                )
        lines += ["", f"{name} (columns: target NFE; [n]: the measured NFE where it differs)", ""]
        lines += markdown(["sampler", *map(str, grid)], body)
    for row in ROWS:
        top = results.get((data.name, row.label, grid[-1]))
        if grid[-1] >= 1000 and top is not None and not top["sw"] <= 1.5 * ref["sw"]:
            notes.append(f"{data.name}, {row.label}: SW {fmt(top['sw'])} at NFE {top['nfe']} is over 1.5x the floor")
    return lines


def comparison_tables(results: Results, tolerances: tuple[float, ...]) -> list[str]:
    """DPM-Solver++(2M) at 10 NFE under several settings, and the adaptive ODE by tolerance."""

    def cells(name: str, label: str, key: Any, nfe: bool) -> list[str]:
        r = results.get((name, label, key))
        if r is None:
            return ["—"] * (nfe + (3 if name == "ring" else 2))
        out = [str(r["nfe"])] if nfe else []
        if name == "ring":
            return out + [fmt(r["sw"]), fmt(r["off_mode"], percent=True), moment_cell(r)]
        return out + [fmt(r["sw"]), moment_cell(r)]

    header = ["ring SW", "ring off-mode", "ring mean / cov err", "64-D SW", "64-D mean / cov err"]
    lines = ["", "## DPM-Solver++(2M) at 10 NFE: library settings against ours (lower_order_final=True)", ""]
    lines += markdown(
        ["settings", "NFE", *header],
        [[r.label, *cells("ring", r.label, 10, True), *cells("64-D", r.label, 10, False)] for r in BEFORE_AFTER],
    )
    if any(results.get((name, "ode", tol)) for name in ("ring", "64-D") for tol in tolerances):
        lines += ["", "## Adaptive probability-flow ODE ('ode', VP SDE, Tsit5): NFE set by rtol = atol", ""]
        lines += markdown(
            ["rtol = atol", "ring NFE", *header[:3], "64-D NFE", *header[3:]],
            [[f"{tol:g}", *cells("ring", "ode", tol, True), *cells("64-D", "ode", tol, True)] for tol in tolerances],
        )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2000 / 1000 samples, NFE 5, 10, 50; writes no files")
    p.add_argument("--out", type=Path, default=None, help=f"markdown output (default {RESULTS}, none with --quick)")
    args = p.parse_args()
    out = args.out or (None if args.quick else RESULTS)
    grid, tolerances = (QUICK_NFE_GRID, ODE_TOLERANCES[:2]) if args.quick else (NFE_GRID, ODE_TOLERANCES)
    datasets = {
        "2-D ring: 8 modes, radius 1, std 0.05": Dataset(
            "ring", exact.ring(8, radius=1.0, std=0.05), 2000 if args.quick else 10_000, off_mode=True
        ),
        f"64-D mixture: 16 components, std 0.3, mean separation {SEP_64D:g} std": Dataset(
            "64-D", mixture_64d(), 1000 if args.quick else 4000, off_mode=False
        ),
    }
    start = time.perf_counter()
    notes: list[str] = []
    extra = set(inspect.signature(dj.samplers.dpm_solver_pp_sample).parameters) - DPM_OPTIONS_IN_TABLE
    extra -= {"model_fn", "schedule", "key", "x_T", "steps", "prediction"}
    if extra:
        notes.append(f"dpm_solver_pp_sample has options no BEFORE_AFTER row sets: {sorted(extra)}")
    results: Results = {}
    for data in datasets.values():
        results |= evaluate(data, grid, tolerances, notes)
    lines = [
        "# Sampler quality on exact Gaussian-mixture denoisers",
        "",
        f"`python benchmarks/sampler_quality.py{' --quick' if args.quick else ''}`: jax {jax.__version__} on "
        f"{jax.devices()[0].device_kind}; samplers registered: {', '.join(dj.samplers.names())}.",
    ]
    for title, data in datasets.items():
        lines += dataset_section(data, title, results, grid, notes)
    lines += comparison_tables(results, tolerances)
    lines += ["", f"Wall time {time.perf_counter() - start:.0f} s."]
    lines += ["", "Notes:", "", *(f"- {n}" for n in notes)] if notes else []
    text = "\n".join(lines) + "\n"
    print(text)
    if out is not None:
        out.write_text(text)
        with out.with_suffix(".jsonl").open("w") as f:
            for (name, label, key), r in results.items():
                if r is not None:
                    f.write(json.dumps({"dataset": name, "row": label, "target": key, **r}) + "\n")


if __name__ == "__main__":
    main()
