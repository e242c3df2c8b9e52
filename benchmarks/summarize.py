"""Summarises compare_unet.sh's JSON lines: median images/s per implementation, and ratios to torch."""

import json
import statistics
import sys
from collections import defaultdict


def implementation(record: dict) -> str:
    if record["bench"] == "torch_unet":
        return "torch"
    return "jax (xla default)" if record.get("xla_default") else "jax"


def main(path: str) -> None:
    runs: dict[tuple[str, str], list[float]] = defaultdict(list)
    for line in open(path):
        record = json.loads(line)
        runs[(record["mode"], implementation(record))].append(record["images_per_s"]["median"])
    print("| mode | implementation | images/s (median of rounds) | rounds | ratio to torch |")
    print("|---|---|---|---|---|")
    for mode in ("fwd", "train", "ddim"):
        torch = statistics.median(runs[(mode, "torch")]) if runs[(mode, "torch")] else None
        for impl in ("torch", "jax", "jax (xla default)"):
            values = runs[(mode, impl)]
            if not values:
                continue
            median = statistics.median(values)
            ratio = f"{median / torch:.2f}x" if torch else "-"
            print(f"| {mode} | {impl} | {median:.1f} | {len(values)} | {ratio} |")


if __name__ == "__main__":
    main(sys.argv[1])
