"""Runs one training job as N local processes, each with K simulated CPU devices.

    python launch/local.py --num_processes=2 --devices_per_process=4 -- \\
        --config=configs/ddpm_swissroll.py --workdir=/tmp/swissroll_2x4

Everything after `--` goes to `python -m diffusion_jax.main`. Each process gets
`--coordinator_address=127.0.0.1:<free port> --num_processes=N --process_id=i`, so together they
form the same multi-process JAX runtime as N hosts of a TPU pod or GPU cluster (a global mesh of
N·K devices, batches built per process, collectives between processes over gloo, JAX's default
CPU collectives). It is how the multi-host code paths are exercised on one machine; it is not
faster than one process with N·K devices (they all share the same cores).

Output lines are prefixed with `[p<i>]`. If a process fails, the others are stopped (a JAX
process whose peer is gone would otherwise wait for its collectives or the coordinator's
heartbeat timeout) and the launcher exits with the failed process's status; Ctrl-C stops all.
"""

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OWN_FLAGS = ("--coordinator_address", "--num_processes", "--process_id")  # set here, per process
_DEVICE_COUNT = re.compile(r"--xla_force_host_platform_device_count=\S*")
_GRACE_S = 10.0  # after SIGTERM, how long a process may take to exit before SIGKILL


def free_port() -> int:
    """A TCP port that is free on localhost now (the OS picks it) for process 0's coordinator."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The launcher's flags; `main_args` holds everything after `--` for diffusion_jax.main."""
    parser = argparse.ArgumentParser(
        prog="launch/local.py",
        description="Run diffusion_jax.main as N local CPU processes of K devices each (a simulated multi-host run).",
        epilog="example: python launch/local.py --num_processes=2 --devices_per_process=4 -- "
        "--config=configs/ddpm_swissroll.py --workdir=/tmp/x",
    )
    parser.add_argument("--num_processes", type=int, default=2, help="processes to start (default 2)")
    parser.add_argument("--devices_per_process", type=int, default=4, help="simulated CPU devices each (default 4)")
    parser.add_argument("--port", type=int, default=0, help="coordinator port on 127.0.0.1 (default: a free one)")
    parser.add_argument("main_args", nargs="*", help="arguments for python -m diffusion_jax.main, after --")
    args = parser.parse_args(argv)
    if args.num_processes < 1:
        parser.error(f"--num_processes: {args.num_processes}; expected a positive int")
    if args.devices_per_process < 1:
        parser.error(f"--devices_per_process: {args.devices_per_process}; expected a positive int")
    if not 0 <= args.port < 65536:
        parser.error(f"--port: {args.port}; expected 1-65535, or 0 for a free port")
    for arg in args.main_args:
        if arg.split("=")[0] in OWN_FLAGS:
            parser.error(f"{arg}: the launcher sets {', '.join(OWN_FLAGS)} for each process; remove it")
    return args


def child_command(main_args: Sequence[str], port: int, num_processes: int, process_id: int) -> list[str]:
    """`python -m diffusion_jax.main <main_args>` joined to the coordinator as process `process_id`."""
    return [
        sys.executable, "-m", "diffusion_jax.main", *main_args,
        f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={num_processes}", f"--process_id={process_id}",
    ]


def child_env(environ: dict[str, str], devices_per_process: int) -> dict[str, str]:
    """`environ` for a child: CPU only, `devices_per_process` simulated devices, this repo importable.

    The device count replaces any count already in XLA_FLAGS (other XLA flags are kept). JAX is
    pinned to the CPU: N processes would otherwise all grab the same local GPUs.
    """
    xla_flags = _DEVICE_COUNT.sub("", environ.get("XLA_FLAGS", ""))
    python_path = os.pathsep.join(p for p in (str(REPO), environ.get("PYTHONPATH")) if p)
    return {
        **environ,
        "XLA_FLAGS": f"{xla_flags} --xla_force_host_platform_device_count={devices_per_process}".strip(),
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": python_path,
        "PYTHONUNBUFFERED": "1",
    }


def _stream(proc: subprocess.Popen, prefix: str, lock: threading.Lock) -> None:
    for line in proc.stdout:
        with lock:
            sys.stdout.write(f"{prefix}{line}")
            sys.stdout.flush()


def _stop(procs: Sequence[subprocess.Popen]) -> None:
    """SIGTERM to every process still running, then SIGKILL to any still there after the grace period."""
    running = [p for p in procs if p.poll() is None]
    for p in running:
        p.terminate()
    deadline = time.monotonic() + _GRACE_S
    for p in running:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _exit_status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode  # killed by signal s: 128 + s, as a shell reports


def supervise(commands: Sequence[Sequence[str]], env: dict[str, str], poll_s: float = 0.2) -> int:
    """Runs the commands together, streaming their output prefixed `[p<i>]`.

    Returns 0 when all exit 0. When one fails, the others are stopped and its status is
    returned (a signal s as 128 + s); on Ctrl-C all are stopped and 130 is returned.
    """
    lock = threading.Lock()
    procs, threads = [], []
    try:
        for i, command in enumerate(commands):
            proc = subprocess.Popen(
                command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
            )
            procs.append(proc)
            thread = threading.Thread(target=_stream, args=(proc, f"[p{i}] ", lock), daemon=True)
            thread.start()
            threads.append(thread)
        status = 0
        while status == 0:
            codes = [p.poll() for p in procs]  # every process, every time: poll() is what sets returncode
            failed = [(i, code) for i, code in enumerate(codes) if code not in (None, 0)]
            if failed:
                i, code = failed[0]
                status = _exit_status(code)
                with lock:
                    print(f"[launch] process {i} exited with status {code}; stopping the others", file=sys.stderr)
            elif None not in codes:
                break
            else:
                time.sleep(poll_s)
    except KeyboardInterrupt:
        status = 128 + signal.SIGINT
    finally:
        _stop(procs)
        for thread in threads:
            thread.join(timeout=5)
    return status


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    port = args.port or free_port()
    commands = [
        child_command(args.main_args, port, args.num_processes, i) for i in range(args.num_processes)
    ]
    print(
        f"[launch] {args.num_processes} process(es) x {args.devices_per_process} CPU device(s), "
        f"coordinator 127.0.0.1:{port}",
        file=sys.stderr,
    )
    return supervise(commands, child_env(dict(os.environ), args.devices_per_process))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
