"""Side-by-side throughput: the PyTorch/diffusers reference scripts against `throughput.py`, interleaved.

    python benchmarks/compare.py --torch-py /path/to/venv/bin/python [--bench ../shared/bench] \
        [--rounds 3] [--workloads all|quick|LIST] [--variant 'LABEL: ENV=VALUE --flag ...'] [--out FILE]

Each round runs every workload once for PyTorch (`torch_unet.py` / `torch_dit.py` from --bench) and
once for every JAX variant (`jax`: the project as users run it, plus any --variant), one process
after the other, alternating which goes first from round to round, so the machine's drift hits them
alike. Each process runs under a time limit; its peak RSS comes from wait4(). One JSON line per
process goes to --out (default benchmarks/results/compare-<date>.jsonl); at the end
`summarize.py` prints the table. Before each process the driver waits (--quiet-wait, default at most
120 s) until other processes use fewer than --quiet-below cores (default 0.3).

Workloads are MODEL/MODE/DTYPE, e.g. unet-small/train/bfloat16; mode `dpm` (20-step DPM-Solver++(2M))
runs diffusers' DPMSolverMultistepScheduler loop from this directory's `torch_sampler.py`. `all` is
every workload of the issue in float32 and bfloat16 (bf16: the models' `dtype` against torch.autocast); `quick` only the
small U-Net's. A --variant is a label, a colon, then environment assignments and throughput.py
flags, e.g. `--variant 'jemalloc: LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2'` or
`--variant 'xla-default: --xla-default'`. `--peak` also runs ../shared/bench/peak.py (numpy fp32
4096^2 matmul) once per round, for the machine's peak in the same run.
"""

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMALL = [f"unet-small/{mode}/{dtype}" for dtype in ("float32", "bfloat16") for mode in ("fwd", "train", "ddim")]
SMALL.insert(3, "unet-small/dpm/float32")  # DPM-Solver++(2M), 20 steps; torch side fp32 only
ALL = SMALL + [
    f"{w}/{dtype}" for dtype in ("float32", "bfloat16") for w in ("unet-cifar/train", "dit-s2/fwd", "dit-s2/train")
]
WORKLOADS = {"all": ALL, "quick": SMALL}


def torch_command(py: str, bench: Path, model: str, mode: str, dtype: str, extra: list[str]) -> list[str]:
    if model == "dit-s2":  # torch_dit.py defaults: DiT-S/2, 32x32x4, 10 classes, batch 16
        return [py, str(bench / "torch_dit.py"), "--mode", mode, "--dtype", dtype, *extra]
    config = {"unet-small": "small", "unet-cifar": "cifar"}[model]
    if mode == "dpm":  # DPMSolverMultistepScheduler, 20 steps: this directory's torch_sampler.py
        return [py, str(ROOT / "benchmarks" / "torch_sampler.py"), "--config", config, "--scheduler", "dpm",
                "--bench", str(bench), *extra]
    return [py, str(bench / "torch_unet.py"), "--config", config, "--mode", mode, "--dtype", dtype, *extra]


def parse_variant(spec: str) -> tuple[str, dict[str, str], list[str]]:
    label, _, rest = spec.partition(":")
    env, args = {}, []
    for token in shlex.split(rest):
        if not token.startswith("-") and "=" in token:
            name, value = token.split("=", 1)
            env[name] = value
        else:
            args.append(token)
    return label.strip(), env, args


def busy_cores(seconds: float = 2.0) -> float:
    """Cores the whole machine kept busy over the next `seconds` (from /proc/stat)."""

    def sample():
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in f.readline().split()[1:8])
        return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")

    start = sample()
    time.sleep(seconds)
    return (sample() - start) / seconds


def wait_quiet(below: float, max_wait: float) -> tuple[float, float]:
    """Waits (at most max_wait s) until other processes use fewer than `below` cores; (waited s, last load)."""
    start = time.perf_counter()
    load = busy_cores()
    while load >= below and time.perf_counter() - start < max_wait:
        load = busy_cores()
    return round(time.perf_counter() - start, 1), round(load, 2)


def run(cmd: list[str], env: dict[str, str], timeout: float) -> dict:
    """Runs cmd; returns rc, wall time, the child's peak RSS (wait4) and its last stdout line as JSON."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env}, stdout=stdout, stderr=stderr, text=True)
        rc, rusage = None, None
        while rc is None:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                rc, rusage = os.waitstatus_to_exitcode(status), ru
                proc.returncode = rc
            elif time.perf_counter() - start > timeout:
                proc.kill()
            else:
                time.sleep(0.2)
        stdout.seek(0)
        lines = [line for line in stdout.read().splitlines() if line.startswith("{")]
        stderr.seek(0)
        err = stderr.read()
    rec = {
        "rc": rc,
        "wall_s": round(time.perf_counter() - start, 2),
        "maxrss_mb": round(rusage.ru_maxrss / 1024, 1) if rusage else None,
        "result": json.loads(lines[-1]) if rc == 0 and lines else None,
    }
    if rec["result"] is None:
        rec["stderr_tail"] = err[-2000:]
    return rec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--torch-py", default=os.environ.get("TORCH_PY"), help="Python with torch 2.13.0 + diffusers")
    p.add_argument("--jax-py", default=sys.executable)
    p.add_argument("--bench", default=str(ROOT.parent / "shared" / "bench"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workloads", default="all", help="all | quick | comma-separated MODEL/MODE/DTYPE")
    p.add_argument("--variant", action="append", default=[], help="extra JAX variant 'LABEL: ENV=V --flag'")
    p.add_argument("--no-default-jax", action="store_true", help="run only the --variant JAX runs")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--reps", type=int, default=None, help="passed to both sides (default: each script's)")
    p.add_argument("--peak", action="store_true", help="also run peak.py (numpy fp32 matmul) once per round")
    p.add_argument("--timeout", type=float, default=400.0, help="seconds per process")
    p.add_argument(
        "--quiet-below",
        type=float,
        default=0.3,
        help="before each process, wait until other processes use fewer cores than this ...",
    )
    p.add_argument("--quiet-wait", type=float, default=120.0, help="... for at most this many seconds")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    if not a.torch_py and not a.no_torch:
        p.error("--torch-py (or TORCH_PY) is required unless --no-torch")
    bench = Path(a.bench).resolve()
    workloads = WORKLOADS.get(a.workloads) or [w.strip() for w in a.workloads.split(",") if w.strip()]
    out = Path(a.out or ROOT / "benchmarks" / "results" / f"compare-{datetime.date.today().isoformat()}.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    variants = [] if a.no_default_jax else [("jax", {}, [])]
    variants += [parse_variant(v) for v in a.variant]
    reps = ["--reps", str(a.reps)] if a.reps else []

    for rnd in range(1, a.rounds + 1):
        if a.peak:
            wait_quiet(a.quiet_below, a.quiet_wait)
            rec = run(
                [a.torch_py, str(bench / "peak.py"), "--backend", "numpy", "--op", "matmul", "--reps", "10"],
                {},
                a.timeout,
            )
            rec.update(round=rnd, workload="peak/matmul/float32", impl="numpy")
            with open(out, "a") as f:
                f.write(json.dumps(rec) + "\n")
        for workload in workloads:
            model, mode, dtype = workload.split("/")
            jobs = [] if a.no_torch else [("torch", {}, torch_command(a.torch_py, bench, model, mode, dtype, reps))]
            for label, env, args in variants:
                cmd = [
                    a.jax_py,
                    "benchmarks/throughput.py",
                    "--model",
                    model,
                    "--mode",
                    mode,
                    "--dtype",
                    dtype,
                    *reps,
                    *args,
                ]
                jobs.append((label, env, cmd))
            if rnd % 2 == 0:
                jobs.reverse()
            for label, env, cmd in jobs:
                waited, load = wait_quiet(a.quiet_below, a.quiet_wait)
                rec = run(cmd, env, a.timeout)
                rec.update(
                    round=rnd,
                    workload=workload,
                    impl=label,
                    busy_cores_before=load,
                    waited_s=waited,
                    env=env,
                    cmd=shlex.join(cmd),
                )
                r = rec["result"] or {}
                ips = (r.get("images_per_s") or {}).get("median")
                print(
                    f"round {rnd} {workload:28s} {label:12s} rc={rec['rc']} "
                    f"{'-' if ips is None else f'{ips:8.2f}'} img/s  rss {rec['maxrss_mb']} MB  "
                    f"({rec['wall_s']} s; other load before {load:.2f} after waiting {waited} s)",
                    file=sys.stderr,
                    flush=True,
                )
                with open(out, "a") as f:
                    f.write(json.dumps(rec) + "\n")
    subprocess.run([a.jax_py, str(ROOT / "benchmarks" / "summarize.py"), str(out)], check=False)


if __name__ == "__main__":
    main()
