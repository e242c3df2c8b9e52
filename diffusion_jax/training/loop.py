"""The training loop: build, resume, step, log, checkpoint, sample."""

import time
from pathlib import Path

import jax
import ml_collections
from absl import logging

from diffusion_jax import data
from diffusion_jax.training import experiment
from diffusion_jax.training.checkpoint import Checkpointer, abstract_like
from diffusion_jax.training.sampling import generate, save_samples
from diffusion_jax.training.state import TrainState
from diffusion_jax.training.step import make_train_step
from diffusion_jax.training.writer import MetricWriter, Progress


def _every(step: int, period: int, last: int) -> bool:
    return step == last or (period > 0 and step % period == 0)


def train(config: ml_collections.ConfigDict, workdir: str | Path) -> TrainState:
    """Trains `config` in `workdir`, resuming from its newest checkpoint if there is one.

    Writes `config.json`, `checkpoints/`, TensorBoard events, `metrics.jsonl` and
    `samples/` (DESIGN §4 'Workdir'). Returns the final train state.
    """
    workdir = Path(workdir)
    exp = experiment.build(config)  # validates the whole config before compiling
    workdir.mkdir(parents=True, exist_ok=True)
    training = config.training

    checkpointer = Checkpointer(workdir / "checkpoints", max_to_keep=training.keep_checkpoints)
    if checkpointer.latest_step() is not None:
        state = checkpointer.restore(abstract_like(exp.initial_state, exp.replicated))
        logging.info("Resumed from step %d of %s", int(state.step), checkpointer.directory)
    else:
        state = jax.device_put(exp.initial_state, exp.replicated)
        if jax.process_index() == 0:
            (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    start_step = int(state.step)
    if start_step >= training.num_steps:
        logging.info("Already at step %d of training.num_steps=%d: nothing to train", start_step, training.num_steps)
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    logging.info(
        "Model %s: %.2fM parameters; %d device(s), mesh %s", config.model.name, num_params / 1e6,
        jax.device_count(), dict(exp.mesh.shape),
    )

    batches = data.create_iterator(
        config.data, global_batch_size=training.batch_size, seed=config.seed, start_step=start_step,
        sharding=exp.batch_sharding,
    )
    train_step = jax.jit(
        make_train_step(exp.graphdef, exp.schedule, exp.tx, exp.lr_schedule, config),
        in_shardings=(exp.replicated, exp.batch_sharding),
        out_shardings=(exp.replicated, exp.replicated),
        donate_argnums=0,
    )
    writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
    progress = Progress(start_step, training.num_steps)
    sample_key = jax.random.fold_in(exp.root_key, 2)
    pending = []
    started = time.perf_counter()

    for step in range(start_step + 1, training.num_steps + 1):
        state, metrics = train_step(state, next(batches))
        pending.append(metrics)
        if step == start_step + 1:
            jax.block_until_ready(state.step)
            logging.info("First step (with compilation) took %.1fs", time.perf_counter() - started)
            progress.update(step)
        if _every(step, training.log_every, training.num_steps):
            host = jax.device_get(pending)
            pending = []
            scalars = {k: float(sum(m[k] for m in host) / len(host)) for k in host[0]}
            progress.update(step)
            scalars["steps_per_sec"] = progress.steps_per_sec
            writer.write_scalars(step, scalars)
            logging.info(progress.line(step, {k: scalars[k] for k in ("loss", "grad_norm")}))
        if _every(step, training.checkpoint_every, training.num_steps):
            checkpointer.save(step, state, config)
        if _every(step, training.sample_every, training.num_steps):
            with progress.excluded():
                samples = generate(
                    exp.sample_fn, experiment.sampling_params(config, state), jax.random.fold_in(sample_key, step),
                    config.sample.num_samples,
                )
                if jax.process_index() == 0:
                    png, _ = save_samples(workdir / "samples", step, samples, scale=config.sample.png_scale)
                    logging.info("Wrote %s", png)

    checkpointer.wait()
    checkpointer.close()
    writer.close()
    return state
