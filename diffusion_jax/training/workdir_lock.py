"""A lock on a training workdir: one run writes a workdir at a time.

`<workdir>/lock.json` names its holder (host, pid, start time, a heartbeat the holder
refreshes while it runs). It is created with O_CREAT | O_EXCL, so of two runs started
together exactly one gets it; the other stops at once with one line naming the holder.
A lock whose holder is gone is taken over with a warning: on the same host when its pid
no longer runs (or runs another program: the pid's start time is recorded), elsewhere when
its heartbeat is older than `stale_after_s` (a shared filesystem cannot see a remote pid).
A takeover renames the stale file first, which only one of several racing runs can do.

Only training takes the lock (process 0 of a multi-process run); sample and eval modes
read a workdir without it.
"""

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from types import TracebackType

from absl import logging

from diffusion_jax.errors import ConfigError

LOCK_FILE = "lock.json"


class WorkdirLocked(ConfigError):
    """Another live run holds the workdir's lock."""


def _process_start_ticks(pid: int) -> int | None:
    """The start time of process `pid` in clock ticks since boot (Linux /proc), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22; the command name may hold spaces


def _pid_running(pid: int, start_ticks: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        pass
    now_ticks = _process_start_ticks(pid)
    return start_ticks is None or now_ticks is None or now_ticks == start_ticks


def describe(holder: dict) -> str:
    """'host H, pid P, started <time>, heartbeat Ns ago' for a lock file's contents."""
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    age = time.time() - holder.get("heartbeat", 0)
    return f"host {holder.get('host')}, pid {holder.get('pid')}, started {started}, heartbeat {age:.0f}s ago"


class WorkdirLock:
    """Holds `<workdir>/lock.json` from `acquire()` (or `with`) until `release()`.

    A thread rewrites the heartbeat every `heartbeat_s` seconds. If the file stops being
    ours (a run elsewhere judged us dead and took over), `lost` becomes the new holder's
    description, and the training loop stops before it writes another checkpoint.
    """

    def __init__(self, workdir: str | Path, *, stale_after_s: float = 900.0, heartbeat_s: float = 30.0):
        self.path = Path(workdir) / LOCK_FILE
        self.stale_after_s = stale_after_s
        self.heartbeat_s = min(heartbeat_s, stale_after_s / 3)
        self.lost: str | None = None
        self._token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = time.time()

    def _contents(self) -> dict:
        pid = os.getpid()
        return {
            "host": socket.gethostname(), "pid": pid, "pid_start_ticks": _process_start_ticks(pid),
            "started": self._started, "heartbeat": time.time(), "token": self._token,
        }

    def _read(self) -> dict | None:
        """The lock file's contents; None if it vanished; {} if it is not (yet) valid JSON."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            holder = json.loads(text)
        except json.JSONDecodeError:
            return {}
        return holder if isinstance(holder, dict) else {}

    def _is_live(self, holder: dict) -> bool:
        if not holder:  # being written by its creator right now, or garbage: judge by the file's age
            try:
                return time.time() - self.path.stat().st_mtime < 5.0
            except FileNotFoundError:
                return False
        if holder.get("host") == socket.gethostname():
            return _pid_running(int(holder.get("pid", -1)), holder.get("pid_start_ticks"))
        return time.time() - float(holder.get("heartbeat", 0)) < self.stale_after_s

    def acquire(self) -> "WorkdirLock":
        """Takes the lock, or raises `WorkdirLocked` naming the live holder (one line)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(50):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read()
                if holder is None:
                    continue  # released between our open and read: try again
                if self._is_live(holder):
                    if not holder:
                        time.sleep(0.1)  # its creator is writing it
                        continue
                    raise WorkdirLocked(
                        f"--workdir: {self.path.parent} is in use by another run ({describe(holder)}); stop that "
                        f"run or use another --workdir (a lock left by a killed run is taken over automatically)"
                    ) from None
                stale = self.path.with_name(f"{LOCK_FILE}.stale-{self._token}")
                try:
                    os.rename(self.path, stale)  # atomic: of several runs taking over, one succeeds
                except FileNotFoundError:
                    continue
                stale.unlink(missing_ok=True)
                logging.warning("Took over the lock of %s left by a run that is gone (%s)", self.path.parent,
                                describe(holder) if holder else "an unreadable lock file")
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self._contents(), f)
            self._thread = threading.Thread(target=self._beat, name="workdir-lock-heartbeat", daemon=True)
            self._thread.start()
            return self
        raise WorkdirLocked(f"--workdir: could not take the lock {self.path} (it kept changing hands)")

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            holder = self._read()
            if holder is None or holder.get("token") != self._token:
                self.lost = describe(holder) if holder else "the lock file was removed"
                logging.error("Lost the lock of %s: %s", self.path.parent, self.lost)
                return
            temporary = self.path.with_name(f"{LOCK_FILE}.{self._token}")
            try:
                temporary.write_text(json.dumps(self._contents()))
                os.replace(temporary, self.path)
            except OSError as e:  # e.g. a full disk: the lock stays, with an older heartbeat
                logging.warning("Could not refresh the heartbeat of %s: %s", self.path, e)
                temporary.unlink(missing_ok=True)

    def release(self) -> None:
        """Stops the heartbeat and removes the lock file if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        holder = self._read()
        if holder and holder.get("token") == self._token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
