#!/usr/bin/env bash
# Side-by-side U-Net throughput: diffusers (PyTorch) reference vs diffusion_jax, interleaved.
#
#   TORCH_PY=/path/to/venv/bin/python BENCH=../shared/bench bash benchmarks/compare_unet.sh [small|cifar] [rounds]
#
# TORCH_PY: a Python with torch==2.13.0 and diffusers (see ../shared/bench/README.md).
# Each round runs every mode for torch, JAX with the project's XLA flags, and JAX with
# jaxlib's default flags, one after the other, so the machine's drift hits all three alike.
# Appends JSON lines to ${OUT:-benchmarks/results}/unet_<config>.jsonl and prints a table.
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:-small}
rounds=${2:-3}
bench=${BENCH:-../shared/bench}
out=${OUT:-benchmarks/results}
mkdir -p "$out"
log="$out/unet_${config}.jsonl"
for round in $(seq "$rounds"); do
  for mode in fwd train ddim; do
    echo "round $round: $mode" >&2
    "${TORCH_PY:?set TORCH_PY}" "$bench/torch_unet.py" --config "$config" --mode "$mode" --no-flops >> "$log"
    python benchmarks/unet_throughput.py --config "$config" --mode "$mode" >> "$log"
    python benchmarks/unet_throughput.py --config "$config" --mode "$mode" --xla-default >> "$log"
  done
done
python benchmarks/summarize.py "$log"
