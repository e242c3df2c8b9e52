"""Orbax checkpoints of the train state, with the resolved config saved in each one."""

import errno
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from diffusion_jax.errors import ConfigError
from diffusion_jax.training.mesh import path_name
from diffusion_jax.training.state import TrainState

# orbax's own log records of a failed background save (each with a traceback of ~40 lines), and
# asyncio's about the writes it abandoned (they name the save's temporary directory). The
# Checkpointer reports that failure as one CheckpointWriteError line, so the entry point drops these.
_ORBAX_SAVE_FAILURE_RECORDS = (
    "_SignalingThread.run() raised an exception", "in background save thread", "Save Finalize thread",
    ".orbax-checkpoint-tmp",
)


# orbax saves a replicated array by splitting it into one slice per replica, each written by its own device
# ("replica-parallel"); every slice is a device dispatch. For the hundreds of small arrays of a train state
# (biases, norms, Adam's moments of them) the dispatches cost more than the writes: a 4-step tiny digits run
# with 3 checkpoints took 22 s with it and 15 s without on 8 CPU devices (tests/test_training.py's run). Arrays
# whose slice would be under this size are written whole by one replica; larger ones keep replica-parallel.
REPLICA_PARALLEL_MIN_SLICE_BYTES = 1 << 20


def _write_small_arrays_from_one_replica() -> None:
    """Registers orbax's jax.Array handler (process-wide, as orbax's registry is) with
    `REPLICA_PARALLEL_MIN_SLICE_BYTES`; the rest of its configuration (the array metadata store) is kept."""
    current = ocp.type_handlers.get_type_handler(jax.Array)
    if getattr(current, "_min_slice_bytes_for_replica_parallel", None) == REPLICA_PARALLEL_MIN_SLICE_BYTES:
        return
    handler = ocp.type_handlers.ArrayHandler(
        array_metadata_store=getattr(current, "_array_metadata_store", None),
        min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_SLICE_BYTES,
    )
    ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)


def is_orbax_save_failure_record(message: str) -> bool:
    """Whether a log message is orbax's (or asyncio's) report of a failed background save."""
    return any(text in message for text in _ORBAX_SAVE_FAILURE_RECORDS)


class CheckpointWriteError(RuntimeError):
    """A checkpoint that could not be written (disk full, permission, quota): one line saying
    which step, the bytes it needed and the bytes free, and the newest intact step."""


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

    Each save first checks the free space against the newest checkpoint's size (the
    state's size before the first), and a write that fails in the background (a full
    disk, a permission or quota error) is reported by the next `save`, `poll` or `wait`
    as a `CheckpointWriteError`; its partial directory is removed, and every finished
    checkpoint is left as it was.
    """

    def __init__(self, directory: str | Path, max_to_keep: int | None = None):
        self.directory = Path(directory).absolute()
        _write_small_arrays_from_one_replica()
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=True, create=True),
            item_handlers={"state": ocp.StandardCheckpointHandler(), "config": ocp.JsonCheckpointHandler()},
        )
        self._damaged: set[int] = set()  # steps that failed to restore; set aside before re-saving
        self._pending: tuple[int, int] | None = None  # (step, bytes needed) of the save in flight

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
        """Starts an async save of step `step` (with `config`); returns once the arrays are copied.

        Raises `CheckpointWriteError` if the previous save failed, or if the disk has less
        room than this checkpoint needs (nothing is written then).
        """
        self._finish_pending()
        if step in self._damaged:
            self._set_aside(step)
        needed = self._expected_bytes(state)
        free = shutil.disk_usage(self.directory).free
        if free < needed:
            raise CheckpointWriteError(self._failure(step, "not enough free space", needed, free))
        try:
            self._manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config.to_dict())
                ),
            )
        except Exception as e:  # noqa: BLE001  a synchronous part of the write failed
            self._discard_partial(step)
            raise CheckpointWriteError(self._failure(step, _reason(e), needed)) from e
        self._pending = (step, needed)

    def poll(self) -> None:
        """Raises `CheckpointWriteError` if the save in flight has already failed; never blocks."""
        if self._pending is None:
            return
        try:
            self._manager.check_for_errors()
        except Exception as e:  # noqa: BLE001  reported as one line
            self._pending_failed(e)

    def _finish_pending(self) -> None:
        if self._pending is None:
            return
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001  reported as one line
            self._pending_failed(e)
        self._pending = None

    def _pending_failed(self, error: Exception) -> None:
        step, needed = self._pending
        self._pending = None
        self._discard_partial(step)
        raise CheckpointWriteError(self._failure(step, _reason(error), needed)) from error

    def _expected_bytes(self, state: TrainState) -> int:
        """The newest checkpoint's size on disk, or before the first one this host's share of the state."""
        newest = self.latest_step()
        if newest is not None:
            files = (self.directory / str(newest)).rglob("*")
            return sum(f.stat().st_size for f in files if f.is_file())
        return sum(leaf.nbytes for leaf in jax.tree.leaves(state)) // jax.process_count()

    def _failure(self, step: int, reason: str, needed: int, free: int | None = None) -> str:
        if free is None:
            free = shutil.disk_usage(self.directory).free
        newest = self.latest_step()
        kept = f"the newest intact checkpoint is step {newest}" if newest is not None else "no checkpoint is saved yet"
        return (
            f"the checkpoint of step {step} could not be written to {self.directory}: {reason} (it needs about "
            f"{_size(needed)}, {_size(free)} free); {kept}"
        )

    def _discard_partial(self, step: int) -> None:
        """Removes what a failed save left (orbax never lists it) and re-reads the directory."""
        if jax.process_index() == 0:
            for partial in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
                shutil.rmtree(partial, ignore_errors=True)
        self._manager.reload()

    def restore_subtrees(self, step: int, abstract: dict[str, Any]) -> dict[str, Any]:
        """Only the named parts of step `step`'s state (e.g. {'params': ..., 'ema_params': [...]}),
        restored into the ShapeDtypeStructs (with shardings) of `abstract`; the optimiser state and
        everything else stay on disk (orbax partial restore)."""
        args = ocp.args.PyTreeRestore(
            item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract), partial_restore=True
        )
        with ocp.PyTreeCheckpointer() as checkpointer:
            return checkpointer.restore(self.directory / str(step) / "state", args=args)

    def saved_config(self, step: int) -> dict[str, Any] | None:
        """The config saved with the checkpoint of `step`, or None if it cannot be read."""
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        except Exception:  # noqa: BLE001  a missing or damaged config item
            return None
        return restored.config

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
                    "config.optim and config.training.ema_decays / ema_sigma_rels, or use a new --workdir)"
                )
        extra = sorted(set(saved) - set(expected))
        if extra:
            raise ConfigError(
                f"--workdir: the checkpoint of step {step} in {self.directory} does not match this config: it has "
                f"{extra[0]} (shape {saved[extra[0]]}), which this config does not (check config.model, config.optim "
                "and config.training.ema_decays / ema_sigma_rels, or use a new --workdir)"
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
        """Waits for the save in flight; raises `CheckpointWriteError` if it failed."""
        self._finish_pending()

    def close(self) -> None:
        """Waits for the save in flight (a failure is logged, not raised) and closes the manager."""
        try:
            self._finish_pending()
        except CheckpointWriteError as e:
            logging.error("%s", e)
        self._manager.close()


def _size(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:.1f} MiB" if num_bytes >= 2**20 else f"{num_bytes / 2**10:.1f} KiB"


def _reason(error: BaseException) -> str:
    """What went wrong, briefly: the OS error's name where one is known (orbax wraps tensorstore's)."""
    if isinstance(error, OSError) and error.errno is not None:
        return f"{errno.errorcode.get(error.errno, error.errno)}: {error.strerror}"
    code = re.search(r"os_error_code='(\d+)'", str(error))
    if code:
        number = int(code[1])
        return f"{errno.errorcode.get(number, number)}: {os.strerror(number)}"
    return f"{type(error).__name__}: {_first_line(error)}"


def _first_line(error: Exception) -> str:
    return str(error).splitlines()[0][:200] if str(error) else ""


def abstract_like(state: TrainState, sharding: jax.sharding.Sharding) -> TrainState:
    """ShapeDtypeStructs of `state` (arrays or abstract values) placed with `sharding`."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)
