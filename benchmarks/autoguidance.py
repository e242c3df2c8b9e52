"""Autoguidance against classifier-free guidance: fidelity and diversity together (Karras et al. 2024).

(a) The exact ring (8 modes, std 0.05). The "model" is the same ring too wide (std 0.1, an underfit network's
typical error), the autoguidance "guide" wider still (std 0.2); CFG guides the class-conditional version of
the model by its unconditional one. For each weight w (s = 1 + w): the entropy of the nearest-mode shares
(diversity across modes; log 8 = 2.079 when balanced), the rms distance to the nearest mode (the truth's
spread is 0.05), the mean outward offset from the mode centres (bias), the sliced Wasserstein distance to
exact samples and the off-mode share (> 4 std from every centre). DPM-Solver++(2M), 25 steps, N = 10,000.

(b) Digits (with --workdir): a trained digits run guided by a checkpoint of itself trained less (--guide_step,
or another run with --guide_workdir), sampled with `LoadedModel.sample(guide=...)` at each scale and scored
with the shipped digits classifier: digits-FID against the train split, the entropy of the predicted classes
(log 10 = 2.303 when balanced) and the IS analogue. With --cfg_workdir, a class-conditional run's CFG at the
same scales beside it.

    python benchmarks/autoguidance.py                                  # (a) only, ~1 minute
    python benchmarks/autoguidance.py --workdir=runs/ddpm_digits --guide_step=500 \\
        --cfg_workdir=runs/cfg_digits                                  # (a) and (b)
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import diffusion_jax as dj
from diffusion_jax import exact, guidance

WEIGHTS = (0.0, 0.5, 1.0, 2.0, 3.0)
SCALES = (1.0, 1.5, 2.0, 3.0)


def ring_row(x: np.ndarray, truth: exact.GaussianMixture, reference: np.ndarray) -> list[str]:
    nearest_dist = np.linalg.norm(x[:, None] - truth.means[None], axis=-1)
    nearest = nearest_dist.argmin(1)
    shares = np.bincount(nearest, minlength=len(truth.means)) / len(x)
    offset = x - truth.means[nearest]
    entropy = -(shares * np.log(np.maximum(shares, 1e-12))).sum()
    outward = (offset * truth.means[nearest]).sum(1).mean()
    return [f"{entropy:.3f}", f"{np.sqrt((offset**2).mean()):.3f}", f"{outward:+.3f}",
            f"{exact.sliced_wasserstein(x, reference):.3f}", f"{np.mean(nearest_dist.min(1) > 4 * truth.std):.1%}"]


def mixture_table(n: int = 10_000) -> list[str]:
    sched = dj.schedules.linear(1000)
    truth, model, weak = (exact.ring(8, 1.0, std) for std in (0.05, 0.1, 0.2))
    reference = truth.sample(np.random.default_rng(0), n)
    x_T = jax.random.normal(jax.random.key(0), (n, 2))
    labels = jnp.arange(n) % 8
    def draw(model_fn) -> np.ndarray:
        run = jax.jit(lambda key, x: dj.samplers.get("dpm_solver++")(model_fn, sched, key, x, steps=25,
                                                                       prediction="x0"))
        return np.asarray(run(jax.random.key(1), x_T))

    lines = ["| guidance | w | class entropy | spread (truth 0.05) | outward bias | SW | off-mode |",
             "|---|---|---|---|---|---|---|"]
    exact_row = ring_row(truth.sample(np.random.default_rng(1), n), truth, reference)
    lines.append("| exact samples (the floor) | — | " + " | ".join(exact_row) + " |")
    for w in WEIGHTS:
        fn = guidance.autoguidance(exact.x0_model(model, sched), exact.x0_model(weak, sched), w)
        lines.append(f"| autoguidance (guide std 0.2) | {w:g} | " + " | ".join(ring_row(draw(fn), truth, reference))
                     + " |")
    for w in WEIGHTS[1:]:
        fn = guidance.classifier_free(exact.conditional_x0_model(model, sched), labels, 8, w)
        lines.append(f"| CFG (cycling labels) | {w:g} | " + " | ".join(ring_row(draw(fn), truth, reference)) + " |")
    return lines


def digits_table(args: argparse.Namespace) -> list[str]:
    from diffusion_jax.metrics import digits

    evaluator = digits.default_evaluator()
    model = dj.load(args.workdir)
    guide = dj.load(args.guide_workdir or args.workdir, step=args.guide_step)
    lines = [f"Model {args.workdir} step {model.step}; guide {args.guide_workdir or args.workdir} step {guide.step}; "
             f"{args.num_samples} samples, {args.sampler} {args.steps} steps.", "",
             "| guidance | s | digits-FID | class entropy | IS analogue | seconds |", "|---|---|---|---|---|---|"]

    def row(name: str, loaded: dj.LoadedModel, scale: float, **kwargs) -> str:
        start = time.perf_counter()
        x = np.asarray(loaded.sample(jax.random.key(0), args.num_samples, sampler=args.sampler, steps=args.steps,
                                     guidance_scale=scale, **kwargs))
        seconds = time.perf_counter() - start
        line = (f"| {name} | {scale:g} | {evaluator.fid(x):.2f} | {evaluator.class_entropy(x):.3f} | "
                f"{evaluator.inception_score(x):.2f} | {seconds:.0f} |")
        print(line, flush=True)
        return line

    for scale in SCALES:
        lines.append(row("autoguidance", model, scale, guide=guide))
    if args.cfg_workdir:
        conditional = dj.load(args.cfg_workdir)
        for scale in SCALES:
            lines.append(row(f"CFG ({args.cfg_workdir})", conditional, scale))
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", help="a trained digits run: (b) guides it")
    p.add_argument("--guide_step", type=int, help="the guide: this checkpoint step of --workdir (or --guide_workdir)")
    p.add_argument("--guide_workdir", help="the guide: another (weaker) run; default --workdir itself")
    p.add_argument("--cfg_workdir", help="a class-conditional digits run: its CFG at the same scales")
    p.add_argument("--num_samples", type=int, default=1500)
    p.add_argument("--sampler", default="dpm_solver++")
    p.add_argument("--steps", type=int, default=25)
    args = p.parse_args()
    dj.runtime.configure_xla_flags()  # main's XLA:CPU flags, before the first computation
    start = time.perf_counter()
    print("\n".join(["## (a) exact ring", ""] + mixture_table()), flush=True)
    if args.workdir:
        print("\n".join(["", "## (b) digits", ""] + digits_table(args)))
    print(f"\n{time.perf_counter() - start:.0f}s; jax {jax.__version__} on {jax.devices()[0].platform}")


if __name__ == "__main__":
    main()
