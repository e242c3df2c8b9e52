"""REPA's convergence speed-up on digits: `ddpm_digits` trained with and without the alignment loss.

Both runs are `configs/ddpm_digits.py` (same seed, data order and optimiser), evaluated every `--every` steps by
the training loop's own eval (`eval.every`: digits-FID of `--num_samples` samples, DDIM 25 steps from the 0.995
EMA); the REPA run adds λ = 0.5 times the cosine alignment of U-Net tap `--layer` with the frozen digits
classifier's last conv map (`diffusion_jax.repa`). Reported: digits-FID at every eval step, and the first step at
which each run reaches the baseline's final FID (the speed-up is the ratio of those steps).

Caveat: the encoder is the classifier digits-FID is computed with, so part of a gain may be the denoiser learning
that classifier's features rather than better digits; the paper's encoder (DINOv2) is independent of its FID's
Inception network.

    python benchmarks/repa_convergence.py --out=runs/repa_cmp        # ~30 min on 2 CPU cores
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "repa_convergence.md"
METRIC = "digits_fid"


def train(workdir: Path, steps: int, every: int, num_samples: int, repa_layer: int | None) -> float:
    """Trains `ddpm_digits` into `workdir` (REPA at `repa_layer`, or none); returns the wall time in seconds."""
    flags = [f"--config.training.num_steps={steps}", f"--config.eval.every={every}",
             "--config.eval.metrics=('digits',)", f"--config.eval.num_samples={num_samples}",
             "--config.sample.sampler=ddim", "--config.sample.steps=25", "--config.training.sample_every=0",
             f"--config.training.checkpoint_every={steps}"]
    if repa_layer is not None:
        flags += ["--config.repa.weight=0.5", f"--config.repa.layer={repa_layer}"]
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "diffusion_jax.main", "--config=configs/ddpm_digits.py",
                    f"--workdir={workdir}", *flags], check=True)
    return time.perf_counter() - start


def fid_curve(workdir: Path) -> dict[int, float]:
    """{step: digits-FID} from the run's `eval/eval_<step>.json`."""
    curve = {}
    for path in (workdir / "eval").glob("eval_*.json"):
        results = json.loads(path.read_text())
        curve[int(results["step"])] = float(results["metrics"][METRIC])
    return dict(sorted(curve.items()))


def first_step_at(curve: dict[int, float], threshold: float) -> int | None:
    return next((step for step, fid in curve.items() if fid <= threshold), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/repa_cmp")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--num_samples", type=int, default=1000)
    parser.add_argument("--layer", type=int, default=2)
    args = parser.parse_args()
    out = Path(args.out)
    seconds = {name: train(out / name, args.steps, args.every, args.num_samples, layer)
               for name, layer in (("baseline", None), ("repa", args.layer))}
    curves = {name: fid_curve(out / name) for name in seconds}
    target = curves["baseline"][max(curves["baseline"])]
    reached = {name: first_step_at(curve, target) for name, curve in curves.items()}
    lines = [f"`ddpm_digits`, {args.steps} steps, digits-FID of {args.num_samples} DDIM-25 samples every "
             f"{args.every} steps; REPA: λ 0.5, U-Net tap {args.layer}, digits-classifier encoder. Wall time "
             f"{seconds['baseline']:.0f} s / {seconds['repa']:.0f} s (with evals).", "",
             "| step | " + " | ".join(curves) + " |", "|---|" + "---|" * len(curves)]
    for step in curves["baseline"]:
        lines.append(f"| {step} | " + " | ".join(f"{curve.get(step, float('nan')):.2f}" for curve in curves.values())
                     + " |")
    lines += ["", f"Steps to the baseline's final digits-FID {target:.2f}: baseline {reached['baseline']}, REPA "
              f"{reached['repa']}" + (f" ({reached['baseline'] / reached['repa']:.1f}x sooner)." if reached['repa']
                                      else " (not reached).")]
    text = "\n".join(lines)
    print(text)
    RESULTS.write_text("# REPA convergence on digits\n\n" + text + "\n")


if __name__ == "__main__":
    main()
