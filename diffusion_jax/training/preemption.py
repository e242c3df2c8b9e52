"""Preemption and Ctrl-C: turn SIGTERM, SIGINT (or JAX's multi-host preemption notice) into a clean stop."""

import os
import signal
import threading
from types import FrameType, TracebackType

import jax
from jax.experimental import multihost_utils

INTERRUPT_EXIT_CODE = 130  # 128 + SIGINT, the shell's convention for a run stopped with Ctrl-C


class PreemptionWatcher:
    """`should_stop(step)` is True once the run has been asked to stop; `reason` says by what.

    One process: SIGTERM and SIGINT (Ctrl-C) handlers set a flag; the loop then saves the
    current step and stops. A second Ctrl-C exits at once (status 130) without waiting for
    the save: orbax writes a checkpoint into a temporary directory and renames it when
    complete, so the newest complete checkpoint is never touched. Several processes
    (`jax.distributed`): JAX's preemption service receives the notice and
    `multihost_utils.reached_preemption_sync_point` names the step at which every host
    stops together, so all of them save the same step. Used as a context manager; the
    previous handlers come back on exit.
    """

    def __init__(self) -> None:
        self._requested = threading.Event()
        self._multihost = jax.process_count() > 1
        self._previous: dict[int, signal.Handlers] = {}
        self.reason: str | None = None  # 'SIGTERM' | 'Ctrl-C' once requested

    def __enter__(self) -> "PreemptionWatcher":
        if not self._multihost and threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        interrupt = signum == signal.SIGINT
        if interrupt and self._requested.is_set():
            os.write(2, b"\nSecond Ctrl-C: exiting now; the newest complete checkpoint is kept\n")
            os._exit(INTERRUPT_EXIT_CODE)
        if interrupt:
            os.write(2, b"\nCtrl-C: saving the current step, then exiting (Ctrl-C again exits at once)\n")
        self.reason = self.reason or ("Ctrl-C" if interrupt else "SIGTERM")
        self._requested.set()

    def should_stop(self, step: int) -> bool:
        if self._multihost:
            return multihost_utils.reached_preemption_sync_point(step)
        return self._requested.is_set()
