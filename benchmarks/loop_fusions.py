"""How fast XLA:CPU runs the non-matmul ops of a U-Net step, alone: bandwidth and cores used per op.

Each op is jitted alone on an NHWC activation and timed over `--reps` calls; reported are ms per call, GB/s
(the input read once plus the output written once) and the cores the process kept busy (user CPU / wall).
The ops are the kinds the small U-Net's step is made of besides convolutions and dots (`op_profile.py`):

  silu        SiLU and a scale-shift (an activation fusion)
  axpy        a multiply-add (the memory-bound floor of an elementwise fusion)
  gn_stats    GroupNorm's per-group mean over H, W and C/G (32 groups)
  sum_nhw     a per-channel sum over N, H and W (a bias or GroupNorm-parameter gradient)
  to_cnhw     the NHWC -> channel-major transpose that a filter-gradient convolution's operands need

    python benchmarks/loop_fusions.py [--reps 50]     # ~20 s; the process as the entry point sets it up for a U-Net
"""

import argparse
import json
import resource
import time

from diffusion_jax.runtime import configure_xla_flags, reexec_with_huge_page_malloc

OPS = {
    "silu": lambda jax, jnp, x: jax.nn.silu(x) * 1.5 + 0.5,
    "axpy": lambda jax, jnp, x: x * 1.5 + 0.5,
    "gn_stats": lambda jax, jnp, x: jnp.mean(x.reshape(x.shape[0], -1, 32, x.shape[-1] // 32), axis=(1, 3)),
    "sum_nhw": lambda jax, jnp, x: jnp.sum(x, axis=(0, 1, 2)),
    "to_cnhw": lambda jax, jnp, x: jnp.transpose(x, (3, 0, 1, 2)) + 1,
}
SHAPES = ((64, 16, 16, 64), (64, 16, 16, 256), (64, 32, 32, 256))  # the small U-Net's 4 MB level, then larger


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=50)
    args = parser.parse_args()
    reexec_with_huge_page_malloc()  # as the entry point runs: no page faults on each call's output buffer
    configure_xla_flags()  # the U-Net's flags (YNN fusions off), before JAX starts its backend
    import jax
    import jax.numpy as jnp

    for shape in SHAPES:
        x = jnp.ones(shape, jnp.float32)
        for name, op in OPS.items():
            fn = jax.jit(lambda x, op=op: op(jax, jnp, x))
            out = fn(x).block_until_ready()
            start_cpu, start = resource.getrusage(resource.RUSAGE_SELF).ru_utime, time.perf_counter()
            for _ in range(args.reps):
                fn(x).block_until_ready()
            wall = time.perf_counter() - start
            cpu = resource.getrusage(resource.RUSAGE_SELF).ru_utime - start_cpu
            moved = (x.size + out.size) * 4 * args.reps
            print(json.dumps({"shape": list(shape), "op": name, "ms": round(wall / args.reps * 1e3, 3),
                              "gb_per_s": round(moved / wall / 1e9, 2), "cores": round(cpu / wall, 2)}))


if __name__ == "__main__":
    main()
