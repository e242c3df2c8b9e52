"""The training loop: build, resume, step, log, checkpoint, sample; stop cleanly when asked."""

import itertools
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from diffusion_jax import latent
from diffusion_jax.errors import ConfigError, TrainingInterrupted, TrainingStopped
from diffusion_jax.evaluate import Evaluator, write_results
from diffusion_jax.training import ema_snapshots, experiment, run_config, throughput
from diffusion_jax.training import mesh as mesh_lib
from diffusion_jax.training.checkpoint import Checkpointer, CheckpointWriteError
from diffusion_jax.training.preemption import PreemptionWatcher
from diffusion_jax.training.sampling import generate, save_samples
from diffusion_jax.training.state import TrainState
from diffusion_jax.training.workdir_lock import WorkdirLock
from diffusion_jax.training.writer import MetricWriter, Progress


def _every(step: int, period: int, last: int) -> bool:
    return step == last or (period > 0 and step % period == 0)


class _Metrics:
    """Per-step metrics stay on the device until a sync point (log, checkpoint, sample).

    `drain` fetches them in one transfer and enforces `training.on_nonfinite`: under
    'stop' a non-finite step raises before anything else is written; under 'skip' the
    step's update was already dropped inside the train step and is only counted.
    """

    def __init__(self, on_nonfinite: str):
        self.on_nonfinite = on_nonfinite
        self._pending: list[tuple[int, dict[str, jax.Array]]] = []
        self._host: list[dict[str, float]] = []

    def add(self, step: int, metrics: dict[str, jax.Array]) -> None:
        """Queues step `step`'s metrics, then waits for the step before it to finish.

        The wait bounds how far the host runs ahead of the devices to two steps: one
        executing, one queued behind it, which keeps accelerators busy. Unbounded
        run-ahead deadlocks XLA:CPU with several devices (a fast loop fills a device's
        32-computation in-flight limit; the blocked launches then hold every thread of
        the client's pool, and no device can finish its part of the next all-reduce).
        """
        if self._pending:
            jax.block_until_ready(self._pending[-1][1])
        self._pending.append((step, metrics))

    def drain(self, last_saved: int | None) -> None:
        steps = [s for s, _ in self._pending]
        fetched = jax.device_get([m for _, m in self._pending])
        self._pending = []
        for step, metrics in zip(steps, fetched, strict=True):
            if metrics["nonfinite"]:
                if self.on_nonfinite == "stop":
                    kept = f"the newest checkpoint (step {last_saved}) is kept" if last_saved else "no checkpoint yet"
                    raise TrainingStopped(
                        f"non-finite loss or gradient at step {step} (loss {metrics['loss']}, grad_norm "
                        f"{metrics['grad_norm']}); training.on_nonfinite='stop': stopped, {kept}"
                    )
                logging.warning("Non-finite loss or gradient at step %d: update skipped", step)
            self._host.append(metrics)

    def averages(self) -> dict[str, float]:
        """Means over the finite steps since the last call, and the number of skipped steps."""
        host, self._host = self._host, []
        finite = [m for m in host if not m["nonfinite"]] or host
        out = {k: float(np.mean([m[k] for m in finite])) for k in host[0] if k != "nonfinite"}
        out["skipped_steps"] = float(sum(m["nonfinite"] for m in host))
        return out


def train(config: ml_collections.ConfigDict, workdir: str | Path, *, allow_config_change: bool = False) -> TrainState:
    """Trains `config` in `workdir`, resuming from its newest good checkpoint if there is one.

    Writes `config.json`, `checkpoints/` (each with the resolved config), TensorBoard events,
    `metrics.jsonl`, `config_history.jsonl` and `samples/` (DESIGN §4 'Workdir'; a
    `training.objective='classify'` run draws no samples and logs its accuracy on noised images
    instead). The workdir is locked for the run (`workdir_lock`): a second run on it stops at
    once. A resume whose config differs from the checkpoint's logs the differences and records
    them in `config_history.jsonl`; one that changes the model, the process or the objective
    (`run_config.PROTECTED`) is refused unless `allow_config_change`. On SIGTERM (or a multi-host
    preemption notice) it saves the current step and returns; on Ctrl-C it saves and raises
    `TrainingInterrupted`. Returns the final train state.
    """
    workdir = Path(workdir)
    training = config.training
    lock = WorkdirLock(workdir, stale_after_s=training.get("lock_stale_after_s", 900.0))
    _lock_on_process_0(lock)  # first: a second run on this workdir stops before building anything
    try:
        exp = experiment.build(config)  # validates the whole config before compiling
        if training.get("objective", "denoise") != "classify":  # a training sample's EMA must be one it tracks
            experiment.sampling_params(config, exp.abstract_state)
        eval_every = config.get("eval", {}).get("every", 0)
        evaluator = Evaluator(config, exp, workdir) if eval_every else None  # checks the eval fields now
        checkpointer = Checkpointer(workdir / "checkpoints", max_to_keep=training.keep_checkpoints)
        writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
        try:
            _check_resume(config, workdir, checkpointer, allow_config_change)
            state = checkpointer.restore_or_none(exp.abstract_state)  # onto this run's mesh, whatever the saver's
            if state is None:
                state = exp.init_state()
            else:
                logging.info("Resumed from step %d of %s", int(state.step), checkpointer.directory)
            exp = _latent_scale(config, exp)
            if jax.process_index() == 0:
                run_config.write_config_file(workdir, config)
            return _run(config, workdir, exp, state, checkpointer, writer, evaluator, lock)
        finally:
            checkpointer.close()  # waits for async saves to finish
            writer.close()
    finally:
        if jax.process_index() == 0:
            lock.release()


def _lock_on_process_0(lock: WorkdirLock) -> None:
    """Process 0 takes the workdir lock; every process stops if it could not."""
    error = None
    if jax.process_index() == 0:
        try:
            lock.acquire()
        except ConfigError as e:
            error = e
    if jax.process_count() > 1:
        failed = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
        if failed and error is None:
            raise ConfigError(f"--workdir: {lock.path.parent} is in use by another run (see process 0's log)")
    if error is not None:
        raise error


def _latent_scale(config: ml_collections.ConfigDict, exp: experiment.Experiment) -> experiment.Experiment:
    """A latent run's scale factor: the config's (or, on resume, the checkpoint's: `_check_resume`), else
    LDM's 1 / std of the first training batch's latents, written into the config so that config.json and
    every checkpoint keep it."""
    if exp.first_stage is None:
        return exp
    if exp.first_stage.scale_factor is not None:
        return exp
    if config.latent.scale_factor is None:
        config.latent.scale_factor = latent.scale_factor_from_data(
            config, exp.first_stage, exp.batch_sharding, jax.random.fold_in(exp.root_key, 5)
        )
        logging.info("Latent scale factor 1/std(z) of the first batch: %.5f (stored as latent.scale_factor)",
                     config.latent.scale_factor)
    return experiment.with_scale_factor(exp, config.latent.scale_factor)


def _check_resume(
    config: ml_collections.ConfigDict, workdir: Path, checkpointer: Checkpointer, allow_change: bool
) -> None:
    """Compares this run's config with the newest checkpoint's, before anything compiles."""
    for step in reversed(checkpointer.all_steps()):
        saved = checkpointer.saved_config(step)
        if saved is None:
            continue
        saved_scale = (saved.get("latent") or {}).get("scale_factor")
        if config.get("latent") is not None and config.latent.get("scale_factor") is None and saved_scale:
            config.latent.scale_factor = saved_scale  # computed from the data when the run started
        changes = run_config.diff(run_config.with_defaults(saved), run_config.as_json(config))
        run_config.check_resume(changes, step, allow_change)
        if jax.process_index() == 0:
            run_config.record_resume(workdir, changes, step)
        return


def _run(
    config: ml_collections.ConfigDict,
    workdir: Path,
    exp: experiment.Experiment,
    state: TrainState,
    checkpointer: Checkpointer,
    writer: MetricWriter,
    evaluator: Evaluator | None,
    lock: WorkdirLock,
) -> TrainState:
    training = config.training
    policy = training.get("on_checkpoint_error", "stop")

    def write_failed(error: CheckpointWriteError, final: bool) -> None:
        """Stops the run, or under 'retry' (unless `final`: no interval follows) logs the failure and goes on."""
        if policy == "retry" and not final:
            logging.error("%s; training.on_checkpoint_error='retry': training on, retrying at the next checkpoint",
                          error)
            return
        raise TrainingStopped(f"{error}; stopped (training.on_checkpoint_error={policy!r})") from None

    def save(step: int, final: bool) -> bool:
        """Saves `step` (and with `final` waits until it is written); False if the write failed under 'retry'."""
        if lock.lost:
            raise TrainingStopped(
                f"--workdir: the lock of {workdir} was taken over ({lock.lost}); stopped at step {step} without "
                "saving, so that two runs' checkpoints do not mix"
            )
        try:
            checkpointer.wait()  # the previous save, whose failure is reported (and under 'retry' passed) alone
        except CheckpointWriteError as e:
            write_failed(e, final=False)
        try:
            checkpointer.save(step, state, config)
            if final:
                checkpointer.wait()
        except CheckpointWriteError as e:
            write_failed(e, final)
            return False
        return True

    start_step = int(state.step)
    if start_step >= training.num_steps:
        logging.info("Already at step %d of training.num_steps=%d: nothing to train", start_step, training.num_steps)
        return state
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    logging.info(
        "Model %s: %.2fM parameters; %d device(s) in %d process(es), mesh %s; %s", config.model.name,
        num_params / 1e6, jax.device_count(), jax.process_count(), dict(exp.mesh.shape),
        mesh_lib.describe(exp.state_shardings, state),
    )
    batches = experiment.training_batches(exp, config, start_step)
    first_batch = next(batches)
    train_step, compile_seconds, step_flops = throughput.compile_step(
        experiment.jit_train_step(exp, config), state, first_batch
    )
    batches = itertools.chain([first_batch], batches)
    peak_flops = training.get("peak_flops")
    if peak_flops is None:
        peak_flops = throughput.measure_peak_flops(config.model.get("dtype") or "float32")
    logging.info(
        "Compiled the train step in %.1fs: %.4g GFLOP per device per step (XLA cost analysis); peak %.4g GFLOP/s "
        "per device (%s)", compile_seconds, step_flops / 1e9, peak_flops / 1e9,
        "measured" if training.get("peak_flops") is None else "training.peak_flops",
    )
    progress = Progress(start_step, training.num_steps)
    metrics = _Metrics(training.on_nonfinite)
    sample_key = jax.random.fold_in(exp.root_key, 2)
    classify = training.get("objective", "denoise") == "classify"  # a classifier has no samples to draw
    shown = exp.objective.shown
    last_saved = checkpointer.latest_step()
    started = time.perf_counter()

    with PreemptionWatcher() as preemption:
        for step in range(start_step + 1, training.num_steps + 1):
            state, step_metrics = train_step(state, next(batches))
            metrics.add(step, step_metrics)
            if step == start_step + 1:
                jax.block_until_ready(state.step)
                logging.info("First step took %.1fs after compilation", time.perf_counter() - started)
                progress.update(step)
            if preemption.should_stop(step):
                metrics.drain(last_saved)
                save(step, final=True)
                if preemption.reason == "Ctrl-C":
                    raise TrainingInterrupted(
                        f"interrupted (Ctrl-C): saved the checkpoint of step {step} in {checkpointer.directory}; "
                        "the same command resumes from it"
                    )
                logging.info("Preempted: saved the checkpoint of step %d in %s; exiting", step, checkpointer.directory)
                return state
            if _every(step, training.log_every, training.num_steps):
                metrics.drain(last_saved)
                progress.update(step)
                rate = progress.steps_per_sec
                scalars = metrics.averages() | {
                    "steps_per_sec": rate,
                    "step_time_s": 1.0 / rate if rate else 0.0,
                    "images_per_sec": rate * training.batch_size,
                    "mfu": throughput.utilisation(step_flops, rate, peak_flops),
                }
                writer.write_scalars(step, scalars)
                logging.info(progress.line(step, {k: scalars[k] for k in shown}))
                try:
                    checkpointer.poll()  # a background write that failed is reported now, not at the next save
                except CheckpointWriteError as e:
                    write_failed(e, final=False)
                    last_saved = checkpointer.latest_step()
            if _every(step, training.checkpoint_every, training.num_steps):
                metrics.drain(last_saved)
                if save(step, final=step == training.num_steps):
                    last_saved = step
            if training.get("ema_snapshot_every", 0) and _every(step, training.ema_snapshot_every, training.num_steps):
                metrics.drain(last_saved)
                try:
                    ema_snapshots.write(workdir, step, state.ema_params, config)
                except OSError as e:
                    raise TrainingStopped(f"{e}; stopped at step {step}") from None
            if not classify and _every(step, training.sample_every, training.num_steps):
                metrics.drain(last_saved)
                with progress.excluded():
                    params = experiment.sampling_params(config, state)
                    samples, _ = generate(exp.sample_fn, params, jax.random.fold_in(sample_key, step),
                                          config.sample.num_samples)
                    if jax.process_index() == 0:
                        png, _ = save_samples(workdir / "samples", step, samples, scale=config.sample.png_scale)
                        logging.info("Wrote %s", png)
            if evaluator is not None and (step % config.eval.every == 0 or step == training.num_steps):
                metrics.drain(last_saved)
                with progress.excluded():
                    results = evaluator(state, step)
                    write_results(workdir, results, writer)
                    logging.info("Eval at step %d: %s", step,
                                 ", ".join(f"{k} {v:.4g}" for k, v in results["metrics"].items()))
    return state
