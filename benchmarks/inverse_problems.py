"""Linear inverse problems on a trained digits model: the Tweedie posterior denoiser, ΠGDM and DPS side by side.

Each row runs sample mode (`config.inverse`) on the first --num test digits, measured by an operator with noise
σ_y = --noise_std, and reports what a solver of an inverse problem is judged by: the measurement misfit (RMS of
A x − A x_clean, in [-1, 1] units; the noise itself is σ_y), the PSNR to the clean digit, the fraction the digits
classifier still reads as the true digit, and the seconds (DDIM, --steps steps, deterministic; 2 shared CPU cores,
so seconds are only relative).

    python benchmarks/inverse_problems.py --workdir=runs/ddpm_digits --num=64
"""

import argparse
import time

import jax.numpy as jnp
import numpy as np

from diffusion_jax import inverse, loading
from diffusion_jax.data import load_split
from diffusion_jax.metrics import digits
from diffusion_jax.sample import sample

PROBLEMS = {  # name: config.inverse fields of the operator
    "2x super-resolution": dict(operator="downsample", factor=2),
    "deblur (5 taps, std 1.5)": dict(operator="blur", blur_size=5, blur_std=1.5),
    "inpaint (box)": dict(operator="mask", mask="box"),
}
METHODS = {"tweedie, CG 8": dict(method="tweedie"), "ΠGDM, CG 8": dict(method="pigdm"),
           "DPS ζ=1": dict(method="dps", scale=1.0), "DPS ζ=10": dict(method="dps", scale=10.0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/ddpm_digits", help="an unconditional digits run")
    parser.add_argument("--num", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--noise_std", type=float, default=0.05)
    args = parser.parse_args()

    base = loading.load(args.workdir).config
    clean, labels = load_split(base.data, "test")
    clean, labels = clean[: args.num].astype(np.float32) / 127.5 - 1.0, np.asarray(labels[: args.num])
    evaluator = digits.default_evaluator()
    print(f"| problem | method | misfit (σ_y = {args.noise_std:g}) | PSNR dB | class kept | s |")
    print("|---|---|---|---|---|---|")
    for problem, operator_fields in PROBLEMS.items():
        for method, method_fields in METHODS.items():
            config = base.copy_and_resolve_references()
            config.sample.update(sampler="ddim", steps=args.steps, eta=0.0, num_samples=args.num,
                                 batch_size=min(args.num, 64))
            config.inverse.update(noise_std=args.noise_std, **operator_fields, **method_fields)
            start = time.perf_counter()
            _, npz = sample(config, args.workdir)
            seconds = time.perf_counter() - start
            images = np.load(npz)["arr_0"]
            x = images.astype(np.float32) / 127.5 - 1.0
            mask = None
            if config.inverse.operator == "mask":
                from diffusion_jax.editing import make_mask

                mask = make_mask(config.inverse.mask, x.shape[1:], len(x), seed=config.seed)
            apply = inverse.from_config(config.inverse, mask).apply
            misfit = float(np.sqrt(np.mean((np.asarray(apply(jnp.asarray(x))) - np.asarray(apply(clean))) ** 2)))
            psnr = float(np.mean(10 * np.log10(4.0 / np.maximum(np.mean((x - clean) ** 2, axis=(1, 2, 3)), 1e-10))))
            kept = evaluator.class_accuracy(images, labels)
            print(f"| {problem} | {method} | {misfit:.3f} | {psnr:.1f} | {kept:.2f} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
