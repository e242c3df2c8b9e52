"""Orbax checkpoints of the train state, with the resolved config saved beside it."""

import shutil
import time
from pathlib import Path

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from diffusion_jax.errors import ConfigError
from diffusion_jax.training.mesh import path_name
from diffusion_jax.training.state import TrainState


def _shapes(tree: object) -> dict[str, tuple[int, ...]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {path_name(path): tuple(leaf.shape) for path, leaf in leaves if hasattr(leaf, "shape")}


class Checkpointer:
    """Async orbax checkpoints in `<workdir>/checkpoints/<step>/{state,config}`.

    The data position is the step itself (batches are a pure function of
    (seed, step)), so the state plus the config is all a run needs to resume.
    A save killed midway leaves `<step>.orbax-checkpoint-tmp`, which orbax never
    lists; a finalised checkpoint that fails to restore (a truncated or missing
    file) is skipped for the next older one, and moved to
    `<workdir>/damaged_checkpoints/` only when training saves that step again.
    Restoring changes nothing on disk.
    """

    def __init__(self, directory: str | Path, max_to_keep: int | None = None):
        self.directory = Path(directory).absolute()
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=True, create=True),
            item_handlers={"state": ocp.StandardCheckpointHandler(), "config": ocp.JsonCheckpointHandler()},
        )
        self._damaged: set[int] = set()  # steps that failed to restore; set aside before re-saving

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def restore_step(self, step: int, abstract_state: TrainState) -> TrainState:
        """The checkpoint of `step` (which must exist) restored into `abstract_state`."""
        self._check_compatible(step, abstract_state)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        return self._manager.restore(step, args=args).state

    def save(self, step: int, state: TrainState, config: ml_collections.ConfigDict) -> None:
        """Starts an async save of step `step`; returns once the arrays are copied."""
        if step in self._damaged:
            self._set_aside(step)
        self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config.to_dict())),
        )

    def restore_or_none(self, abstract_state: TrainState) -> TrainState | None:
        """The newest good checkpoint restored into `abstract_state`, or None if there is none.

        `abstract_state` holds `jax.ShapeDtypeStruct`s with the *current* shardings, so
        a checkpoint restores onto whatever mesh this run has (8 devices -> 1 and back).
        A checkpoint whose arrays do not match this config's is a ConfigError naming
        the first mismatched path. A damaged one (a truncated or missing file) is
        skipped with a warning when an older one restores; if none restores, the
        newest one's error is raised. Restoring changes nothing on disk.
        """
        failures: list[tuple[int, Exception]] = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            self._check_compatible(step, abstract_state)
            try:
                restored = self._manager.restore(
                    step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
                )
            except Exception as e:  # noqa: BLE001  decided below: skipped only if an older step restores
                failures.append((step, e))
                continue
            for bad_step, error in failures:
                logging.warning(
                    "Skipped the damaged checkpoint of step %d in %s (%s: %s); resuming from step %d",
                    bad_step, self.directory, type(error).__name__, _first_line(error), step,
                )
            self._damaged = {bad_step for bad_step, _ in failures}
            return restored.state
        if failures:
            step, error = failures[0]
            raise RuntimeError(
                f"no checkpoint in {self.directory} could be restored; the newest, step {step}, failed with "
                f"{type(error).__name__}: {_first_line(error)}"
            ) from error
        return None

    def restore(self, abstract_state: TrainState) -> TrainState:
        """Like `restore_or_none`, but a workdir without a good checkpoint is a ConfigError."""
        state = self.restore_or_none(abstract_state)
        if state is None:
            raise ConfigError(f"--workdir: no checkpoint in {self.directory}; train first with --mode=train")
        return state

    def _check_compatible(self, step: int, abstract_state: TrainState) -> None:
        try:
            saved = _shapes(self._manager.item_metadata(step)["state"])
        except Exception:  # noqa: BLE001  unreadable metadata: let the restore attempt decide
            return
        expected = _shapes(abstract_state)
        for path, shape in expected.items():
            if saved.get(path) != shape:
                found = "missing" if path not in saved else f"shape {saved[path]}"
                raise ConfigError(
                    f"--workdir: the checkpoint of step {step} in {self.directory} does not match this config: "
                    f"{path} is {found} in the checkpoint but has shape {shape} here (check config.model, "
                    "config.optim and config.training.ema_decays, or use a new --workdir)"
                )
        extra = sorted(set(saved) - set(expected))
        if extra:
            raise ConfigError(
                f"--workdir: the checkpoint of step {step} in {self.directory} does not match this config: it has "
                f"{extra[0]} (shape {saved[extra[0]]}), which this config does not (check config.model, config.optim "
                "and config.training.ema_decays, or use a new --workdir)"
            )

    def _set_aside(self, step: int) -> None:
        """Moves a damaged step out of orbax's directory, so that it can be saved anew."""
        damaged = self.directory.parent / "damaged_checkpoints" / f"{step}-{int(time.time())}"
        if jax.process_index() == 0:  # one host moves; all of them re-read the directory
            damaged.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(self.directory / str(step)), damaged)
        multihost_utils.sync_global_devices(f"set aside damaged checkpoint {step}")
        self._manager.reload()
        self._damaged.discard(step)
        logging.warning("Moved the damaged checkpoint of step %d to %s before saving that step again", step, damaged)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def _first_line(error: Exception) -> str:
    return str(error).splitlines()[0][:200] if str(error) else ""


def abstract_like(state: TrainState, sharding: jax.sharding.Sharding) -> TrainState:
    """ShapeDtypeStructs of `state` (arrays or abstract values) placed with `sharding`."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)
