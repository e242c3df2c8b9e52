"""Editing trained digits models through sample mode: inpainting (replacement, RePaint, the conditional
denoiser), SDEdit at several t0 and DDIM-inversion editing, each scored on the test digits.

Each row runs `diffusion_jax.sample.sample` (the `--mode=sample` command) with the row's `config.sample`
fields on the first N test digits and scores the samples with the shipped digits classifier:
- inpainting (mask 'half': the right half unknown): `class kept`, the fraction the classifier still reads as the
  original digit; `known err`, the largest difference on the known pixels in uint8 levels (0: exact);
- SDEdit from the test digits: `class kept` (faithfulness) and digits-FID against the train split (realism,
  Meng et al.'s trade-off in t0); `L2`, the mean per-pixel distance to the input in [-1, 1] units;
- inversion editing (a class-conditional model): each digit DDIM-inverted under its own label to t0, then
  re-sampled under another label (0, 1, 2, ... cycling) with guidance; `class kept` is then the fraction that
  became the *requested* label.
Figures: the README's rows' `edits_<step>.png` (input | mask | output rows) are copied to `--figures` when given.

    python benchmarks/editing_quality.py --workdir=runs/ddpm_v_digits --cfg_workdir=runs/cfg_digits \
        --figures=docs/figures          # table to stdout and benchmarks/results/editing_quality.md
    (--rows=inpaint,sdedit,invert picks groups of rows; --out another table file)
"""

import argparse
import shutil
import time
from pathlib import Path

import numpy as np

from diffusion_jax import editing, loading
from diffusion_jax.data import load_split
from diffusion_jax.metrics import digits
from diffusion_jax.sample import sample

RESULTS = Path(__file__).parent / "results" / "editing_quality.md"
README_FIGURES = ("inpaint_replace", "inpaint_repaint", "inpaint_conditional", "sdedit_t0_0.5", "invert_t0_0.5")

INPAINT = {
    "inpaint: replace (DDPM-100)": dict(sampler="ddpm", steps=100, inpaint_method="replace"),
    "inpaint: RePaint j=10 r=5 (DDPM-100)": dict(sampler="ddpm", steps=100, inpaint_method="repaint",
                                                 repaint_jump=10, repaint_resamples=5),
    "inpaint: conditional, CG 8 (DDPM-100)": dict(sampler="ddpm", steps=100, inpaint_method="conditional"),
}
SDEDIT = {f"SDEdit t0={t0} (DDPM-100)": dict(sampler="ddpm", steps=100, t0=t0) for t0 in (0.3, 0.5, 0.7)}
INVERT = {
    f"invert to t0={t0}, re-sample s=2 (DDIM-50)": dict(sampler="ddim", steps=50, eta=0.0, t0=t0, invert=True,
                                                         guidance_scale=2.0)
    for t0 in (0.5, 0.8)
}


def run(workdir: str, fields: dict, num: int) -> tuple[np.ndarray, Path, float]:
    """Sample mode on `workdir` with `fields`: (uint8 samples [num, H, W, C], edits png, seconds)."""
    config = loading.load(workdir).config  # the run's own config, as saved with its checkpoint
    config.sample.update(num_samples=num, batch_size=min(num, 100), png_scale=4, **fields)
    start = time.perf_counter()
    _, npz = sample(config, workdir)
    seconds = time.perf_counter() - start
    step = int(npz.stem.split("_")[-1])
    return np.load(npz)["arr_0"], npz.parent / f"edits_{step}.png", seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/ddpm_v_digits", help="an unconditional digits run")
    parser.add_argument("--cfg_workdir", default="runs/cfg_digits", help="a class-conditional digits run")
    parser.add_argument("--num", type=int, default=200)
    parser.add_argument("--figures", default=None, help="copy each row's edits png here")
    parser.add_argument("--rows", default="inpaint,sdedit,invert", help="which groups of rows to run")
    parser.add_argument("--out", default=str(RESULTS), help="where the markdown table goes")
    args = parser.parse_args()

    config = loading.load(args.workdir).config
    test_images, test_labels = load_split(config.data, "test")
    test_images, test_labels = test_images[: args.num], np.asarray(test_labels[: args.num])
    rows = ["| edit | class kept | known err / L2 | digits-FID | s |", "|---|---|---|---|---|"]

    def figure(png: Path, name: str) -> None:
        if args.figures and name in README_FIGURES:
            Path(args.figures).mkdir(parents=True, exist_ok=True)
            shutil.copy(png, Path(args.figures) / f"{name}.png")

    half = editing.make_mask("half", test_images.shape[1:], len(test_images)) == 1
    groups = set(args.rows.split(","))
    for name, fields in INPAINT.items() if "inpaint" in groups else ():
        images, png, seconds = run(args.workdir, dict(inpaint_image="test", inpaint_mask="half", **fields), args.num)
        known_err = int(np.abs(images.astype(int) - test_images.astype(int))[half].max())
        kept = digits.class_accuracy(images, test_labels)
        rows.append(f"| {name} | {kept:.3f} | {known_err} | {digits.digits_fid(images):.1f} | {seconds:.0f} |")
        figure(png, "inpaint_" + fields["inpaint_method"])
        print(rows[-1], flush=True)
    for name, fields in SDEDIT.items() if "sdedit" in groups else ():
        images, png, seconds = run(args.workdir, dict(init_image="test", **fields), args.num)
        l2 = float(np.sqrt(np.mean(((images.astype(float) - test_images) / 127.5) ** 2)))
        kept = digits.class_accuracy(images, test_labels)
        rows.append(f"| {name} | {kept:.3f} | {l2:.3f} | {digits.digits_fid(images):.1f} | {seconds:.0f} |")
        figure(png, f"sdedit_t0_{fields['t0']}")
        print(rows[-1], flush=True)
    if "invert" in groups:
        for name, fields in INVERT.items():
            images, png, seconds = run(args.cfg_workdir, dict(init_image="test", **fields), args.num)
            requested = np.arange(len(images)) % 100 % 10  # sample labels cycle 0..9 within each batch
            l2 = float(np.sqrt(np.mean(((images.astype(float) - test_images) / 127.5) ** 2)))
            kept = digits.class_accuracy(images, requested)
            rows.append(f"| {name} | {kept:.3f} | {l2:.3f} | {digits.digits_fid(images):.1f} | {seconds:.0f} |")
            figure(png, f"invert_t0_{fields['t0']}")
            print(rows[-1], flush=True)
    table = "\n".join(rows)
    print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    title = f"# Editing quality (`benchmarks/editing_quality.py`, {args.num} test digits)"
    Path(args.out).write_text(f"{title}\n\n{table}\n")


if __name__ == "__main__":
    main()
