"""Metrics out of a run: a progress line, TensorBoard events and metrics.jsonl."""

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

from tensorboardX import SummaryWriter


def format_duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


class MetricWriter:
    """Writes scalars to TensorBoard (tensorboardX: no TensorFlow needed) and to
    `metrics.jsonl`, one JSON object per logged step. Only process 0 writes."""

    def __init__(self, workdir: str | Path, enabled: bool = True):
        self.enabled = enabled
        self._tb = SummaryWriter(logdir=str(workdir)) if enabled else None
        self._jsonl = open(Path(workdir) / "metrics.jsonl", "a") if enabled else None  # noqa: SIM115

    def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        for name, value in scalars.items():
            self._tb.add_scalar(name, value, step)
        self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self._jsonl.flush()
        self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._tb.close()
            self._jsonl.close()


class Progress:
    """Steps/s and ETA between calls; `line()` is the log line a person watches."""

    def __init__(self, start_step: int, num_steps: int):
        self.num_steps = num_steps
        self._last_step, self._last_time = start_step, time.perf_counter()
        self.steps_per_sec = 0.0

    def update(self, step: int) -> None:
        now = time.perf_counter()
        self.steps_per_sec = (step - self._last_step) / max(now - self._last_time, 1e-9)
        self._last_step, self._last_time = step, now

    @contextlib.contextmanager
    def excluded(self) -> Iterator[None]:
        """Time spent inside (sampling, evaluation) does not count against steps/s."""
        start = time.perf_counter()
        yield
        self._last_time += time.perf_counter() - start

    def line(self, step: int, scalars: dict[str, float]) -> str:
        eta = (self.num_steps - step) / self.steps_per_sec if self.steps_per_sec else 0.0
        parts = [f"step {step}/{self.num_steps}"]
        parts += [f"{k} {v:.4g}" for k, v in scalars.items()]
        parts += [f"{self.steps_per_sec:.2f} steps/s", f"ETA {format_duration(eta)}"]
        return " | ".join(parts)

