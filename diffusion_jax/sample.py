"""Sample mode: load the newest checkpoint of a workdir and write samples from it."""

from pathlib import Path

import jax
import ml_collections
from absl import logging

from diffusion_jax import editing, latent
from diffusion_jax.training import experiment
from diffusion_jax.training.checkpoint import Checkpointer
from diffusion_jax.training.sampling import generate, save_edit_grid, save_samples


def sample(config: ml_collections.ConfigDict, workdir: str | Path) -> tuple[Path, Path]:
    """Draws `sample.num_samples` samples with `sample.sampler` from the newest checkpoint.

    Writes `<workdir>/samples/samples_<step>.png` and `.npz`; returns their paths.
    A workdir with no checkpoint runs `model.pretrained` (step 0), or without one is a `ConfigError`
    naming --workdir. Edits and conditioning images (`editing.sample_inputs`: inpainting, SDEdit, DDIM
    inversion, a super-resolution model's low-res images, ControlNet's controls) are made for all
    `sample.num_samples` at once; with `sample.low_res_workdir` the low-res images are that stage-1 run's
    samples, so a cascade is one command. An edited or conditioned run also writes `edits_<step>.png`: rows of
    input | (mask |) output for the first 8 examples (`training.sampling.edit_panels`).
    """
    latent.adopt_saved_scale_factor(config, workdir)  # a latent run's, as training computed it
    exp = experiment.build(config)
    checkpointer = Checkpointer(Path(workdir) / "checkpoints")
    state = experiment.restore_or_pretrained(config, exp, checkpointer)
    step = int(state.step)
    logging.info("Sampling %d with %s from step %d", config.sample.num_samples, config.sample.sampler, step)
    key = jax.random.fold_in(jax.random.fold_in(exp.root_key, 3), step)
    num = config.sample.num_samples
    inputs = editing.sample_inputs(config, exp.example_shape, num, key=jax.random.fold_in(key, 1))
    samples, nfe = generate(exp.sample_fn, experiment.sampling_params(config, state, workdir), key, num, inputs or None,
                            config.sample.batch_size)
    logging.info("%s used %d network evaluations per sample", config.sample.sampler, nfe)
    checkpointer.close()
    directory = Path(workdir) / "samples"
    if jax.process_index() != 0:  # every process drew (and gathered) the samples; one writes them
        return directory / f"samples_{step}.png", directory / f"samples_{step}.npz"
    paths = save_samples(directory, step, samples, scale=config.sample.png_scale)
    logging.info("Wrote %s and %s", *paths)
    if inputs:
        logging.info("Wrote %s", save_edit_grid(directory, step, inputs, samples, scale=config.sample.png_scale))
    return paths
