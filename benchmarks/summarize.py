"""Summarises compare.py's JSON lines as a markdown table: images/s, ratio to torch, % of peak, memory.

    python benchmarks/summarize.py benchmarks/results/compare-DATE.jsonl [...] [--peak 191] [--stat median]

Per workload and implementation: the median over rounds of each run's images/s (--stat: a run's
`median`, or `median_clean` over its uncontended reps), the step time, and the ratio to PyTorch,
taken per round (the runs of one round are neighbours in time) and given as the median and range
over rounds. GFLOP/img is what each side counts: XLA's cost analysis of the compiled program for
JAX (every op), torch's FlopCounterMode for PyTorch (matmul / conv / attention only). % of peak is
GFLOP/s over --peak, by default the numpy fp32 4096^2 matmul peak measured in the same run
(compare.py --peak), else 191 (../shared/bench/baseline.md, measured on a different CPU).
Peak RSS is the process's (wait4). "other load" is the largest, over rounds, of the median number
of cores that other processes used during a run's timed reps; --max-other-load drops the runs
above a limit (PyTorch's OpenMP threads slow down many-fold when another process takes a core).
"""

import argparse
import json
import statistics
from collections import defaultdict

TARGETS = {  # issue 17 (2026-12): fp32 ratios to PyTorch/diffusers
    "unet-small/train": 1.0,
    "unet-small/ddim": 1.3,
    "dit-s2/train": 1.0,
    "unet-cifar/train": 0.85,
}
MODEL_ORDER = ["unet-small", "unet-cifar", "dit-s2"]
MODE_ORDER = ["fwd", "train", "ddim", "dpm"]


def stat(result: dict, key: str, which: str):
    values = result.get(key) or {}
    value = values.get(which)
    return value if value is not None else values.get("median")


def fmt(x, nd=1):
    return "-" if x is None else f"{x:,.{nd}f}"


def order(workload: str):
    model, mode, dtype = workload.split("/")
    return (
        dtype != "float32",
        MODEL_ORDER.index(model) if model in MODEL_ORDER else 9,
        MODE_ORDER.index(mode) if mode in MODE_ORDER else 9,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+")
    p.add_argument(
        "--peak",
        type=float,
        default=None,
        help="GFLOP/s for %% of peak; default: the numpy matmul peak measured in the same run "
        "(compare.py --peak), else 191 (../shared/bench/baseline.md)",
    )
    p.add_argument("--stat", choices=["median", "median_clean"], default="median")
    p.add_argument(
        "--max-other-load",
        type=float,
        default=None,
        help="drop runs during which other processes used more than this many cores (median over "
        "the timed reps); their round partner then has no ratio",
    )
    a = p.parse_args()

    runs = defaultdict(dict)  # (workload, impl) -> {(file, round): record}
    peaks, failed, dropped = [], [], []
    for i, path in enumerate(a.files):
        for line in open(path):
            if not line.strip():
                continue
            rec = json.loads(line)
            if "workload" not in rec:
                continue
            if rec["workload"].startswith("peak/"):
                if rec["result"]:
                    peaks.append(stat(rec["result"], "achieved_gflops", a.stat))
                continue
            if rec["result"] is None:
                failed.append(f"{rec['workload']} {rec['impl']} round {rec['round']}: rc={rec['rc']}")
                continue
            load = statistics.median(rec["result"].get("other_load") or [0])
            if a.max_other_load is not None and load > a.max_other_load:
                dropped.append(f"{rec['workload']} {rec['impl']} round {rec['round']} ({load:.2f} cores)")
                continue
            runs[(rec["workload"], rec["impl"])][(i, rec["round"])] = rec

    if a.peak is None:
        a.peak = round(statistics.median(peaks)) if peaks else 191.0
    if peaks:
        print(
            f"numpy fp32 4096² matmul in the same run: {statistics.median(peaks):.0f} GFLOP/s "
            f"(median of {len(peaks)}; range {min(peaks):.0f}–{max(peaks):.0f})"
        )
    print(f"% of peak below: of {a.peak:g} GFLOP/s\n")
    print(
        "| workload | implementation | images/s | step (ms) | ratio to torch (range) | target | GFLOP/img | "
        "GFLOP/s | % of peak | peak RSS (MB) | compile (s) | rounds | other load |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    workloads = sorted({w for w, _ in runs}, key=order)
    for workload in workloads:
        impls = sorted({i for w, i in runs if w == workload}, key=lambda i: (i != "torch", i != "jax", i))
        torch = runs.get((workload, "torch"), {})
        for impl in impls:
            recs = runs[(workload, impl)]
            ips = {k: stat(r["result"], "images_per_s", a.stat) for k, r in recs.items()}
            median_ips = statistics.median(ips.values())
            batch = next(iter(recs.values()))["result"]["batch"]
            ratio = "1.00×" if impl == "torch" else "-"
            if impl != "torch":
                paired = [ips[k] / stat(torch[k]["result"], "images_per_s", a.stat) for k in ips if k in torch]
                if paired:
                    ratio = f"**{statistics.median(paired):.2f}×** ({min(paired):.2f}–{max(paired):.2f})"
            flops = statistics.median(r["result"].get("flops_per_image") or 0 for r in recs.values()) or None
            gflops = flops * median_ips / 1e9 if flops else None
            compile_s = [r["result"].get("compile_s") for r in recs.values() if r["result"].get("compile_s")]
            other = max(statistics.median(r["result"].get("other_load") or [0]) for r in recs.values())
            target = TARGETS.get(workload.rsplit("/", 1)[0])
            target = f"≥ {target}×" if target and ratio != "-" and impl != "torch" else ""
            print(
                f"| {workload} | {impl} | {median_ips:.2f} ({min(ips.values()):.2f}–{max(ips.values()):.2f}) | "
                f"{1000 * batch / median_ips:.0f} | {ratio} | {target} | "
                f"{fmt(flops / 1e9 if flops else None, 2)} | {fmt(gflops)} | "
                f"{fmt(100 * gflops / a.peak if gflops else None, 0)} | "
                f"{fmt(statistics.median(r['maxrss_mb'] for r in recs.values()), 0)} | "
                f"{fmt(statistics.median(compile_s) if compile_s else None)} | {len(recs)} | {other:.2f} |"
            )
    if failed:
        print("\nFailed runs: " + "; ".join(failed))
    if dropped:
        print(f"\nDropped as contended (other load > {a.max_other_load:g} cores): " + "; ".join(dropped))


if __name__ == "__main__":
    main()
