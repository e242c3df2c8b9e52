"""Preemption: turn SIGTERM (or JAX's multi-host preemption notice) into a clean stop."""

import signal
import threading
from types import FrameType, TracebackType

import jax
from jax.experimental import multihost_utils


class PreemptionWatcher:
    """`should_stop(step)` is True once the run has been asked to stop.

    One process: a SIGTERM handler sets a flag (the loop then saves at the current
    step and exits 0). Several processes (`jax.distributed`): JAX's preemption
    service receives the notice and `multihost_utils.reached_preemption_sync_point`
    names the step at which every host stops together, so all of them save the
    same step. Used as a context manager; the previous SIGTERM handler comes back
    on exit.
    """

    def __init__(self) -> None:
        self._requested = threading.Event()
        self._multihost = jax.process_count() > 1
        self._previous: signal.Handlers | None = None

    def __enter__(self) -> "PreemptionWatcher":
        if not self._multihost and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        self._requested.set()

    def should_stop(self, step: int) -> bool:
        if self._multihost:
            return multihost_utils.reached_preemption_sync_point(step)
        return self._requested.is_set()
