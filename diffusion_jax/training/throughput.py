"""How fast the train step runs: ahead-of-time compilation, its FLOPs, and model-FLOPs utilisation.

MFU (PaLM, Chowdhery et al. 2022, App. B) is the FLOPs the step does per second over the
hardware's peak. Here the step's FLOPs come from XLA's cost analysis of the compiled, partitioned
program (per device, so remat's recomputation counts, and nothing is hand-counted), and the peak
is `training.peak_flops` or, when unset, measured with a matmul on this process's devices.
"""

import functools
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from diffusion_jax import runtime


def compile_step(jitted: Any, *args: Any) -> tuple[Callable, float, float]:
    """(compiled, compile seconds, FLOPs per device per call) of `jitted` for `args`.

    Lowering and compiling ahead of time gives the compile time on its own (the first call
    otherwise mixes it with the step) and the compiled program's cost analysis.
    """
    started = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    seconds = time.perf_counter() - started
    runtime.release_free_heap()  # the compiler's freed memory, ~0.5 GB for a small U-Net's step
    return compiled, seconds, float((compiled.cost_analysis() or {}).get("flops", 0.0))


@functools.cache
def measure_peak_flops(dtype: str = "float32", size: int | None = None, repeats: int = 3) -> float:
    """Matmul FLOP/s of one device of this process, all local devices running at once (once per process).

    Every local device multiplies its own [size, size] matrices in one program, so devices that
    share hardware (simulated CPU devices) share it here as in training. `size` defaults to 8192
    on accelerators and 1024 on the CPU (a few ms per device). Best of `repeats` timed calls. This
    is XLA's own matmul rate, not the datasheet's peak (on a 2-core Xeon: ~150 GFLOP/s, where numpy's
    4096² matmul reached ~300): set `training.peak_flops` to report MFU against a fixed number.
    """
    devices = jax.local_devices()
    size = size or (1024 if devices[0].platform == "cpu" else 8192)
    mesh = jax.make_mesh((len(devices),), ("d",), devices=devices, axis_types=(jax.sharding.AxisType.Auto,))
    sharding = NamedSharding(mesh, PartitionSpec("d"))
    a = jax.device_put(jnp.ones((len(devices), size, size), dtype), sharding)
    matmul = jax.jit(lambda x: jnp.einsum("bij,bjk->bik", x, x), out_shardings=sharding)
    jax.block_until_ready(matmul(a))
    best = np.inf
    for _ in range(repeats):
        started = time.perf_counter()
        jax.block_until_ready(matmul(a))
        best = min(best, time.perf_counter() - started)
    return 2.0 * size**3 / best


def utilisation(flops_per_step: float, steps_per_sec: float, peak_flops: float) -> float:
    """MFU: the step's FLOPs per device times steps/s, over the peak FLOP/s of a device."""
    return flops_per_step * steps_per_sec / peak_flops if peak_flops > 0 else 0.0
