"""A one-node SLURM cluster on this machine ("SLURM in a box"), for tests of launch/slurm.sbatch.

    with SlurmBox(tmp_dir) as box:               # munged, slurmctld, slurmd; waits for the node
        job = box.sbatch(["--ntasks=2", "launch/slurm.sbatch", ...], env)
        box.wait(job)                            # -> (JobState, ExitCode)

Debian's `slurm-wlm` and `munge` (22.05 on bookworm). Every daemon runs in the foreground as a
child of this process, with its key, sockets, state, spool and logs under `tmp_dir` and free
ports, so nothing outside `tmp_dir` is touched and stopping the children stops the cluster. It
runs as root (slurmd starts jobs as the submitting user; SlurmUser=root). The node is `localhost`
with this machine's CPUs; no cgroups (proctrack/linuxproc, task/none), no accounting.
"""

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

import pytest

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "sinfo", "scontrol", "scancel", "srun")
# Job states after which a job neither runs nor will (squeue/scontrol's JobState).
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE"}


def skip_or_fail(message: str) -> None:
    """pytest.skip for a missing launch tool (SLURM, munge, shellcheck), or pytest.fail where the
    environment sets DIFFUSION_JAX_REQUIRE_LAUNCH=1, as .ci/run does after installing them."""
    if os.environ.get("DIFFUSION_JAX_REQUIRE_LAUNCH") == "1":
        pytest.fail(f"{message} (DIFFUSION_JAX_REQUIRE_LAUNCH=1)")
    pytest.skip(message)


class SlurmUnavailable(RuntimeError):
    """SLURM or munge is not installed, or a daemon did not come up (the message says which)."""


def missing_programs() -> list[str]:
    """The SLURM and munge programs not on PATH (apt-get install slurm-wlm munge provides them)."""
    return [p for p in (*DAEMONS, *CLIENTS) if shutil.which(p) is None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_conf(root: Path, cpus: int, ctld_port: int, slurmd_port: int) -> str:
    """slurm.conf for one node, `localhost`, with `cpus` CPUs, everything it writes under `root`."""
    return f"""\
ClusterName=box
SlurmctldHost=localhost
SlurmUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
AuthInfo=socket={root}/munge/munge.socket
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
KillWait=10
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=box Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


class SlurmBox:
    """The cluster's daemons, started by `__enter__` and stopped by `__exit__` (see the module docstring)."""

    def __init__(self, root: Path, cpus: int | None = None, start_timeout: float = 60.0) -> None:
        self.root = root
        self.cpus = cpus or os.cpu_count() or 1
        self.start_timeout = start_timeout
        self.env = dict(os.environ, SLURM_CONF=str(root / "slurm.conf"))
        self._daemons: dict[str, subprocess.Popen] = {}

    def __enter__(self) -> "SlurmBox":
        missing = missing_programs()
        if missing:
            raise SlurmUnavailable(f"not installed: {', '.join(missing)} (apt-get install -y slurm-wlm munge)")
        if os.geteuid() != 0:
            raise SlurmUnavailable("slurmd must run as root to start jobs")
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _start(self) -> None:
        root = self.root
        for sub in ("munge", "state", "spool", "log"):
            (root / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
        key = root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        (root / "slurm.conf").write_text(slurm_conf(root, self.cpus, _free_port(), _free_port()))
        # --force: munged refuses to run as root, and dislikes the world-writable /tmp above its socket.
        self._spawn("munged", ["munged", "--foreground", "--force", f"--key-file={key}",
                               f"--socket={root}/munge/munge.socket", f"--pid-file={root}/munge/munged.pid",
                               f"--log-file={root}/log/munged.log", f"--seed-file={root}/munge/munge.seed"])
        self._wait_until(lambda: (root / "munge" / "munge.socket").exists(), "munged's socket")
        self._spawn("slurmctld", ["slurmctld", "-D", "-i"])  # -i: ignore state left by an earlier box
        self._spawn("slurmd", ["slurmd", "-D", "-N", "localhost"])
        self._wait_until(lambda: self.node_state() == "idle", "the node to be idle in sinfo")

    def _spawn(self, name: str, command: list[str]) -> None:
        with open(self.root / "log" / f"{name}.stdout", "wb") as log:  # the daemon keeps its own descriptor
            self._daemons[name] = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                                   stdin=subprocess.DEVNULL)

    def _wait_until(self, predicate, what: str) -> None:
        deadline = time.monotonic() + self.start_timeout
        while not predicate():
            for name, proc in self._daemons.items():
                if proc.poll() is not None:
                    raise SlurmUnavailable(f"{name} exited with status {proc.returncode}: {self.log_tail(name)}")
            if time.monotonic() > deadline:
                raise SlurmUnavailable(f"timed out after {self.start_timeout:.0f}s waiting for {what}; "
                                       f"slurmd: {self.log_tail('slurmd')}")
            time.sleep(0.2)

    def log_tail(self, name: str, lines: int = 5) -> str:
        """The last lines a daemon logged (its log file, or its stdout before it had one)."""
        for path in (self.root / "log" / f"{name}.log", self.root / "log" / f"{name}.stdout"):
            if path.exists() and path.stat().st_size:
                return " | ".join(path.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"

    def run(self, *command: str) -> str:
        """A SLURM client command against this cluster; its stdout (a failure raises with its stderr)."""
        done = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=60)
        if done.returncode:
            raise RuntimeError(f"{' '.join(command)}: status {done.returncode}: {done.stderr.strip()}")
        return done.stdout

    def node_state(self) -> str:
        """sinfo's state of the node ('idle', 'alloc', 'down*', ...), '' while slurmctld is not answering."""
        done = subprocess.run(["sinfo", "--noheader", "--format=%T"], env=self.env, capture_output=True, text=True,
                              timeout=30)
        return done.stdout.strip() if done.returncode == 0 else ""

    def sbatch(self, args: list[str], env: dict[str, str], cwd: Path) -> int:
        """Submits `sbatch <args>` from `cwd` with the environment `env` (exported to the job); the job id."""
        out = subprocess.run(["sbatch", "--parsable", *args], env=env | {"SLURM_CONF": self.env["SLURM_CONF"]},
                             cwd=cwd, capture_output=True, text=True, timeout=60)
        if out.returncode:
            raise RuntimeError(f"sbatch failed ({out.returncode}): {out.stderr.strip()}")
        return int(out.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """scontrol's fields of a job (JobState, ExitCode, ...); kept for MinJobAge (300 s) after it ends."""
        fields = self.run("scontrol", "show", "job", "--oneliner", str(job_id)).split()
        return dict(f.split("=", 1) for f in fields if "=" in f)

    def wait(self, job_id: int, timeout: float) -> tuple[str, str]:
        """Waits for a job to end; its (JobState, ExitCode), e.g. ('COMPLETED', '0:0')."""
        deadline = time.monotonic() + timeout
        while (info := self.job(job_id))["JobState"] not in FINISHED:
            if time.monotonic() > deadline:
                self.run("scancel", str(job_id))
                raise TimeoutError(f"job {job_id} still {info['JobState']} after {timeout:.0f}s; cancelled it")
            time.sleep(0.5)
        return info["JobState"], info["ExitCode"]

    def stop(self) -> None:
        """Cancels every job, waits for them to end, then stops the daemons (SIGTERM, then SIGKILL)."""
        if "slurmctld" in self._daemons and self._daemons["slurmctld"].poll() is None:
            subprocess.run(["scancel", "--full", "--user=root"], env=self.env, capture_output=True, timeout=60)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                done = subprocess.run(["squeue", "--noheader"], env=self.env, capture_output=True, text=True,
                                      timeout=30)
                if done.returncode or not done.stdout.strip():
                    break
                time.sleep(0.5)
        for name in reversed(list(self._daemons)):
            proc = self._daemons.pop(name)
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
