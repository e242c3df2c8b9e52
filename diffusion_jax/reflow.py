"""Reflow (Liu et al. 2022, arXiv 2209.03003, §2.2): couple noise with what a trained flow makes of it.

    # 1. a rectified flow (`training.objective='flow_matching'`)
    python -m diffusion_jax.main --config=configs/rf_digits.py --workdir=runs/rf_digits
    # 2. its pairs (z, x_0 = ODE(z)); 3. the 2-rectified flow, trained on them from the first one's weights
    python -m diffusion_jax.reflow --workdir=runs/rf_digits --out=runs/rf_digits_pairs --num_pairs=3000 --steps=40
    python -m diffusion_jax.main --config=configs/rf_digits.py --workdir=runs/rf2_digits \\
        --config.flow.pairs_dir=runs/rf_digits_pairs --config.flow.init_workdir=runs/rf_digits

Training on (z, x_0) pairs instead of independent (ε, x_0) makes the new flow's paths straighter (the
coupling it transports is the previous flow's, which does not cross), so fewer Euler steps reach the
same samples. The pairs come from the workdir's sampling EMA and its own sampler (`sample.*`; the
paper uses RK45 on the ODE: `--sampler=ode`, adaptive, is that and costs ~10x Euler-20 here), or
`--sampler`/`--steps`; class-conditional flows pair each z with the label it was drawn for (0, 1, 2, ...
cycling).

A pairs directory holds `noise.npy` and `image.npy` (float32 [N, ...], the model's space), `label.npy`
(int32 [N]) and `meta.json` ({"format", "workdir", "step", "sampler", "options", "num_pairs",
"example_shape"}), written to a temporary directory and renamed, so a stopped run leaves nothing.
"""

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from diffusion_jax import samplers
from diffusion_jax.errors import ConfigError
from diffusion_jax.training.sampling import sample_labels
from diffusion_jax.training.setup import sampler_from_config

FORMAT = 1
META, NOISE, IMAGE, LABEL = "meta.json", "noise.npy", "image.npy", "label.npy"
WRITE_COMMAND = "python -m diffusion_jax.reflow --workdir=RUN --out={out}"


def write_pairs(
    workdir: str | Path, out: str | Path, num_pairs: int, *, sampler: str | None = None, steps: int | None = None,
    batch_size: int = 256, seed: int = 0,
) -> Path:
    """Draws `num_pairs` (z, x_0) pairs from the flow trained in `workdir` into `out`; returns `out`. The map
    z -> x_0 is the run's own sampler and options (`sample.*` of its config), or `sampler` (with its defaults)
    and `steps` when given."""
    from diffusion_jax.loading import load  # loading builds on training; this module is also imported by it

    if num_pairs <= 0 or batch_size <= 0:
        raise ConfigError(f"--num_pairs, --batch_size: {num_pairs}, {batch_size}; both must be positive")
    model = load(workdir, field="--workdir")
    if model.config.diffusion.get("process", "discrete") != "flow":
        raise ConfigError(f"--workdir: {workdir} trained diffusion.process="
                          f"{model.config.diffusion.get('process', 'discrete')!r}; reflow needs a flow ('flow')")
    if sampler is None:
        sample, options = sampler_from_config(model.config.sample)
    else:
        sample, options = samplers.get(sampler), {}
    if steps is not None:
        options["steps"] = steps
    num_classes = model.config.model.get("num_classes")
    labels = (np.zeros(num_pairs, np.int32) if num_classes is None
              else sample_labels(batch_size, num_classes, num_pairs))

    @jax.jit
    def draw(z: jax.Array, label: jax.Array, key: jax.Array) -> jax.Array:
        return sample(model.model_fn(None if num_classes is None else label), model.schedule, key, z,
                      prediction="velocity", **options)

    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    shape = (num_pairs, *model.example_shape)
    noise = np.lib.format.open_memmap(partial / NOISE, "w+", np.float32, shape)
    image = np.lib.format.open_memmap(partial / IMAGE, "w+", np.float32, shape)
    key = jax.random.key(seed)
    for start in range(0, num_pairs, batch_size):
        stop = min(start + batch_size, num_pairs)
        z_key, chain_key = jax.random.split(jax.random.fold_in(key, start))
        z = jax.random.normal(z_key, (batch_size, *model.example_shape), jnp.float32)  # whole batches: one compile
        label = jnp.asarray(np.resize(labels[start:stop], batch_size))
        noise[start:stop] = np.asarray(z)[: stop - start]
        image[start:stop] = np.asarray(draw(z, label, chain_key))[: stop - start]
        logging.info("reflow pairs %d/%d", stop, num_pairs)
    noise.flush(), image.flush()
    np.save(partial / LABEL, labels)
    meta = {"format": FORMAT, "workdir": str(Path(workdir).resolve()), "step": model.step,
            "sampler": sampler or model.config.sample.sampler, "options": options, "num_pairs": num_pairs,
            "example_shape": list(model.example_shape)}
    (partial / META).write_text(json.dumps(meta, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return out


def open_pairs(directory: str | Path, example_shape: tuple[int, ...]) -> dict[str, Any]:
    """The pairs in `directory` as read-only memmaps {'image', 'noise', 'label'}, checked against this run's
    examples; one-line ConfigErrors naming `flow.pairs_dir` otherwise."""
    directory = Path(directory)
    try:
        meta = json.loads((directory / META).read_text())
    except (OSError, ValueError):
        raise ConfigError(f"flow.pairs_dir: {directory} holds no reflow pairs (no readable {META}); write them with: "
                          + WRITE_COMMAND.format(out=directory)) from None
    if meta.get("format") != FORMAT or tuple(meta.get("example_shape", ())) != tuple(example_shape):
        raise ConfigError(f"flow.pairs_dir: {directory} holds pairs of {tuple(meta.get('example_shape', ()))} "
                          f"examples (format {meta.get('format')}); this run's are {tuple(example_shape)}")
    return {"image": np.load(directory / IMAGE, mmap_mode="r"), "noise": np.load(directory / NOISE, mmap_mode="r"),
            "label": np.load(directory / LABEL)}


FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags; defined only when it runs, since the training loop imports this module."""
    flags.DEFINE_string("workdir", None, "The trained flow (training.objective='flow_matching').")
    flags.DEFINE_string("out", None, "The pairs directory to write (replaced if it exists).")
    flags.DEFINE_integer("num_pairs", 6000, "How many (noise, sample) pairs.")
    flags.DEFINE_string("sampler", None, "The sampler that maps noise to samples (None: the run's sample.*).")
    flags.DEFINE_integer("steps", None, "Its steps (None: the run's sample.steps, or the sampler's default).")
    flags.DEFINE_integer("batch_size", 256, "Pairs drawn per compiled batch.")
    flags.DEFINE_integer("seed", 0, "Seed of the noise.")


def main(argv: list[str]) -> None:
    del argv
    try:
        if FLAGS.workdir is None or FLAGS.out is None:
            raise ConfigError("--workdir, --out: both are required")
        write_pairs(FLAGS.workdir, FLAGS.out, FLAGS.num_pairs, sampler=FLAGS.sampler, steps=FLAGS.steps,
                    batch_size=FLAGS.batch_size, seed=FLAGS.seed)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    define_flags()
    app.run(main)
