"""GFLOP/s of each 3x3 convolution shape of a model, per formulation, forward and backward.

    python benchmarks/conv_shapes.py --model unet-small [--torch-py .venv/bin/python] [--reps 20]

For every distinct 3x3 convolution in the model (batch, H, W, C_in, C_out, stride) it times, in
one process and interleaved, the forward `y = conv(x, w)` and the training pass `(dx, dw) =
vjp(conv)(dy)` of:

  xla     `lax.conv_general_dilated` (XLA:CPU's Eigen convolution)
  im2col  the 9 shifted views of the padded input concatenated on the channel axis (im2col,
          Chellapilla et al. 2006), one [B*H'*W', 9C] x [9C, O] matmul; the filter gradient is
          then one matmul too, the input gradient one matmul plus nine shifted adds
  shifted the sum of nine [B*H'*W', C] x [C, O] matmuls, one per tap (no 9x patch buffer)

and, with `--torch-py`, the same shapes in PyTorch (channels-first, its default layout) in a
subprocess; plus the numpy fp32 matmul rate (a 2048^2 matmul) in the same run as the reference
for what this CPU's GEMM reaches. FLOPs: 2*B*H'*W'*9*C_in*C_out forward, twice that backward.
Writes one JSON line per (shape, implementation, pass) to `--out` and prints a table.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp

# (name, [(batch, H, W, C_in, C_out, stride)]) as the throughput.py models build them
MODELS = {
    "unet-small": [  # ch=32, ch_mult=(1, 2, 2), 16x16x1, batch 64
        (64, 16, 16, 1, 32, 1),
        (64, 16, 16, 32, 32, 1),
        (64, 16, 16, 32, 32, 2),
        (64, 8, 8, 32, 64, 1),
        (64, 8, 8, 64, 64, 1),
        (64, 8, 8, 64, 64, 2),
        (64, 4, 4, 64, 64, 1),
        (64, 4, 4, 128, 64, 1),
        (64, 8, 8, 128, 64, 1),
        (64, 8, 8, 96, 64, 1),
        (64, 16, 16, 96, 32, 1),
        (64, 16, 16, 64, 32, 1),
        (64, 16, 16, 32, 1, 1),
    ],
    "unet-cifar": [  # Ho et al. CIFAR: ch=128, ch_mult=(1, 2, 2, 2), batch 16
        (16, 32, 32, 128, 128, 1),
        (16, 16, 16, 256, 256, 1),
        (16, 8, 8, 256, 256, 1),
        (16, 4, 4, 256, 256, 1),
        (16, 32, 32, 256, 128, 1),
        (16, 16, 16, 512, 256, 1),
    ],
}

TORCH_SNIPPET = r"""
import json, sys, time, statistics, torch
torch.set_num_threads(2)
shapes, reps = json.loads(sys.argv[1]), int(sys.argv[2])
for b, h, w, ci, co, s in shapes:
    conv = torch.nn.Conv2d(ci, co, 3, stride=s, padding=1, bias=False)
    x = torch.randn(b, ci, h, w, requires_grad=True)
    with torch.no_grad():
        y = conv(x)
    dy = torch.randn_like(y)
    def fwd():
        with torch.no_grad():
            conv(x)
    def bwd():
        x.grad = None; conv.weight.grad = None
        conv(x).backward(dy)
    for name, fn in (("fwd", fwd), ("train", bwd)):
        for _ in range(3): fn()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
        row = {"shape": [b, h, w, ci, co, s], "impl": "torch", "pass": name, "time_s": statistics.median(ts)}
        print(json.dumps(row))
"""


def _same_padding(size: int, stride: int) -> tuple[int, int]:
    """XLA's SAME padding of a 3-tap window: (before, after)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + 3 - size, 0)
    return total // 2, total - total // 2


def _taps(x: jax.Array, stride: int) -> list[jax.Array]:
    """The nine shifted (and strided) views of SAME-padded x [B, H, W, C], each [B, H', W', C],
    in the kernel's (di, dj) row-major order."""
    b, h, w, c = x.shape
    (top, bottom), (left, right) = _same_padding(h, stride), _same_padding(w, stride)
    xp = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    ho, wo = -(-h // stride), -(-w // stride)
    return [
        xp[:, di : di + stride * (ho - 1) + 1 : stride, dj : dj + stride * (wo - 1) + 1 : stride]
        for di in range(3)
        for dj in range(3)
    ]


def conv3x3_xla(x: jax.Array, kernel: jax.Array, stride: int = 1) -> jax.Array:
    """x [B, H, W, C], kernel [3, 3, C, O] -> [B, H', W', O], XLA's convolution."""
    return jax.lax.conv_general_dilated(
        x, kernel, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def conv3x3_im2col(x: jax.Array, kernel: jax.Array, stride: int = 1) -> jax.Array:
    """x [B, H, W, C], kernel [3, 3, C, O] -> [B, H', W', O], one matmul over the 9C patch columns."""
    patches = jnp.concatenate(_taps(x, stride), axis=-1)  # [B, H', W', 9C]
    return patches @ kernel.reshape(-1, kernel.shape[-1])


def conv3x3_shifted(x: jax.Array, kernel: jax.Array, stride: int = 1) -> jax.Array:
    """x [B, H, W, C], kernel [3, 3, C, O] -> [B, H', W', O], a sum of nine per-tap matmuls."""
    c = x.shape[-1]
    taps = _taps(x, stride)
    return sum(tap @ kernel.reshape(9, c, -1)[i] for i, tap in enumerate(taps))


def conv_flops(shape: tuple, passes: str) -> float:
    b, h, w, ci, co, s = shape
    forward = 2 * b * (h // s) * (w // s) * 9 * ci * co
    return forward if passes == "fwd" else 3 * forward  # fwd + dx + dw


def numpy_matmul_gflops(n: int = 2048, reps: int = 5) -> float:
    import numpy as np

    a = np.random.rand(n, n).astype(np.float32)
    a @ a
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        a @ a
        times.append(time.perf_counter() - start)
    return 2 * n**3 / min(times) / 1e9


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="unet-small")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--torch-py", default=None, help="a Python with torch: time the same shapes there")
    p.add_argument("--out", default=None, help="append JSON lines here")
    args = p.parse_args(argv)

    from diffusion_jax.runtime import configure_xla_flags

    configure_xla_flags("unet")
    import jax
    import jax.numpy as jnp

    shapes = MODELS[args.model]
    rows = []
    impls = {"xla": conv3x3_xla, "im2col": conv3x3_im2col, "shifted": conv3x3_shifted}
    for shape in shapes:
        b, h, w, ci, co, s = shape
        x = jax.random.normal(jax.random.key(0), (b, h, w, ci))
        k = jax.random.normal(jax.random.key(1), (3, 3, ci, co)) * 0.1
        for name, conv in impls.items():
            forward = jax.jit(lambda x, k, conv=conv, s=s: conv(x, k, s))
            y = forward(x, k)
            dy = jnp.ones_like(y)
            train = jax.jit(lambda x, k, dy, conv=conv, s=s: jax.vjp(lambda x, k: conv(x, k, s), x, k)[1](dy))
            for passes, fn, fargs in (("fwd", forward, (x, k)), ("train", train, (x, k, dy))):
                for _ in range(3):
                    jax.block_until_ready(fn(*fargs))
                times = []
                for _ in range(args.reps):
                    start = time.perf_counter()
                    jax.block_until_ready(fn(*fargs))
                    times.append(time.perf_counter() - start)
                rows.append({"shape": list(shape), "impl": name, "pass": passes, "time_s": statistics.median(times)})
    if args.torch_py:
        out = subprocess.run(
            [args.torch_py, "-c", TORCH_SNIPPET, json.dumps(shapes), str(args.reps)],
            capture_output=True, text=True, check=True,
        ).stdout
        rows += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    peak = numpy_matmul_gflops()
    for row in rows:
        row["gflops"] = conv_flops(tuple(row["shape"]), row["pass"]) / row["time_s"] / 1e9
        row["numpy_matmul_gflops"] = peak
    if args.out:
        with open(args.out, "a") as f:
            for row in rows:
                f.write(json.dumps({"model": args.model, **row}) + "\n")

    impl_names = [*impls, *(["torch"] if args.torch_py else [])]
    print(f"numpy fp32 2048^2 matmul in the same run: {peak:.0f} GFLOP/s; cells: GFLOP/s (ms)")
    print("| shape B,H,W,Cin,Cout,stride | pass | " + " | ".join(impl_names) + " |")
    print("|---|---|" + "---|" * len(impl_names))
    by_key = {(tuple(r["shape"]), r["pass"], r["impl"]): r for r in rows}
    totals = {(passes, i): 0.0 for passes in ("fwd", "train") for i in impl_names}
    for shape in shapes:
        for passes in ("fwd", "train"):
            cells = []
            for i in impl_names:
                r = by_key[(tuple(shape), passes, i)]
                totals[(passes, i)] += r["time_s"]
                cells.append(f"{r['gflops']:.0f} ({1e3 * r['time_s']:.2f})")
            print(f"| {','.join(map(str, shape))} | {passes} | " + " | ".join(cells) + " |")
    for passes in ("fwd", "train"):
        cells = " | ".join(f"{1e3 * totals[(passes, i)]:.1f} ms" for i in impl_names)
        print(f"| sum of times | {passes} | {cells} |")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
