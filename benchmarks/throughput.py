"""Throughput of the project's models on this machine: forward, the real train step, the samplers.

Mirrors `../shared/bench/torch_unet.py` (diffusers UNet2DModel) and `../shared/bench/torch_dit.py`
(diffusers DiTTransformer2DModel) workload for workload, so the two can be run side by side
(`benchmarks/compare.py`, `benchmarks/README.md`):

    python benchmarks/throughput.py --model unet-small --mode train [--dtype bfloat16] [--xla-default]

Models (the default batch is the torch scripts'):
  unet-small  16x16x1, channels 32-64-64, 2 res blocks, attention at 8x8 (+ the middle block); batch 64
  unet-cifar  Ho et al.'s CIFAR-10 U-Net, 35.7M parameters, 32x32x3; batch 16
  dit-s2      'DiT-S/2' (12 blocks, width 384, 6 heads, patch 2) on 32x32x4 latents, 10 classes; batch 16

Modes: fwd (one jitted model call), train (the project's own `make_train_step`, jitted with the
state donated, AdamW, L_simple, as `training/loop.py` runs it), ddim and dpm (a sampler from the
registry, 'ddim' with --steps 50 or 'dpm_solver++' (2M, the project's log-SNR steps) with --steps
20 by default, or any --sampler: the whole chain one jitted `lax.scan`; --guidance-weight w wraps a
class-conditional model (dit-s2) in classifier-free guidance, a 2B batch per step). --dtype bfloat16
is the model's `dtype` option (bf16 compute, float32 parameters), the counterpart of PyTorch's bf16
autocast.

Reported (one JSON line on stdout; per-rep progress on stderr):
  images_per_s, time_s   median / min / max / median_clean over --reps timed calls; a rep is clean when
                         other processes used < 0.15 cores during it (`other_load`, from /proc/stat)
  trace_s, compile_s     jax.jit(...).lower(...) and .compile() wall time; first_call_s the first run
  flops_per_image        XLA's cost analysis of the compiled program (`compiled.cost_analysis()`);
                         a `lax.scan` body is counted once, so ddim multiplies by --steps
  achieved_gflops        flops_per_image x images/s, and its fraction of --peak-gflops
                         (default 191: the 4096^2 fp32 matmul peak of ../shared/bench/baseline.md)
  memory                 compiled.memory_analysis() (argument / output / temp buffers), the process's
                         peak RSS (getrusage ru_maxrss), and minor page faults and system CPU per rep
"""

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time

MODELS = {
    # name: (image shape, default batch)
    "unet-small": ((16, 16, 1), 64),
    "unet-cifar": ((32, 32, 3), 16),
    "dit-s2": ((32, 32, 4), 16),
}
CLEAN_OTHER_LOAD = 0.15  # cores; as ../shared/bench/benchutil.py
DEFAULT_PEAK_GFLOPS = 191.0  # fp32 4096^2 matmul, numpy/OpenBLAS, ../shared/bench/baseline.md
_HZ = os.sysconf("SC_CLK_TCK")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="unet-small")
    p.add_argument("--mode", choices=["fwd", "train", "ddim", "dpm"], default="train")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--batch", type=int, default=None, help="default: 64 unet-small, 16 unet-cifar and dit-s2")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: ddim 50, dpm 20)")
    p.add_argument("--sampler", default=None, help="a registry sampler (default: ddim 'ddim', dpm 'dpm_solver++')")
    p.add_argument("--guidance-weight", type=float, default=None, help="classifier-free guidance w (dit-s2)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls, the first (compiling) one included")
    p.add_argument("--reps", type=int, default=None, help="timed calls; default 5 (ddim: 3)")
    p.add_argument("--remat", action="store_true", help="dit-s2: recompute each block in the backward pass")
    p.add_argument(
        "--attention-impl",
        choices=["xla", "cudnn"],
        default=None,
        help="dit-s2: jax.nn.dot_product_attention implementation (default: JAX's choice)",
    )
    p.add_argument("--xla-default", action="store_true", help="do not apply diffusion_jax.runtime's XLA flags")
    p.add_argument(
        "--malloc-keep",
        action="store_true",
        help="glibc: one malloc arena, no mmap, no trimming (mallopt before JAX starts), so XLA's "
        "per-call temporary buffer keeps its pages instead of faulting them in on every call",
    )
    p.add_argument("--peak-gflops", type=float, default=DEFAULT_PEAK_GFLOPS)
    p.add_argument("--dump-hlo", default=None, help="write the optimised HLO text of the compiled program here")
    p.add_argument(
        "--profile", default=None, help="jax.profiler trace of the timed reps into this directory (op_profile.py)"
    )
    return p.parse_args(argv)


def _proc_stat_busy() -> float:
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in f.readline().split()[1:8])
    return (user + nice + system + irq + softirq) / _HZ


def _rusage():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime, r.ru_stime, r.ru_minflt


def time_reps(run, reps: int) -> list[dict]:
    """Times `reps` calls of run(); per rep also own CPU, system CPU, minor faults, other processes' load."""
    out = []
    for i in range(reps):
        busy0, (cpu0, sys0, flt0) = _proc_stat_busy(), _rusage()
        start = time.perf_counter()
        run()
        wall = time.perf_counter() - start
        cpu1, sys1, flt1 = _rusage()
        busy1 = _proc_stat_busy()
        rec = {
            "wall": wall,
            "own_cpu": cpu1 - cpu0,
            "sys_cpu": sys1 - sys0,
            "minflt": flt1 - flt0,
            "other_load": max(0.0, (busy1 - busy0 - (cpu1 - cpu0)) / wall),
        }
        out.append(rec)
        print(
            f"rep {i}: {wall:.4f}s own_cpu={rec['own_cpu']:.2f}s sys={rec['sys_cpu']:.2f}s "
            f"minflt={rec['minflt']} other_load={rec['other_load']:.2f}",
            file=sys.stderr,
        )
    return out


def build_config(args: argparse.Namespace):
    import ml_collections

    from diffusion_jax.config import base_config

    config = base_config()
    shape, default_batch = MODELS[args.model]
    config.data.image_size = shape[0]
    if args.model == "unet-small":
        config.model.update(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(8,))
    if args.model.startswith("unet"):
        config.model.update(dropout=0.0, dtype=args.dtype)  # diffusers' UNet2DModel has no dropout
    else:
        model = dict(name="DiT-S/2", num_classes=10, learn_sigma=False, dtype=args.dtype, remat=args.remat)
        if args.attention_impl:
            model["attention_impl"] = args.attention_impl
        config.model = ml_collections.ConfigDict(model)
    # torch: AdamW(lr=1e-4) with its default weight decay 0.01, no clipping, no EMA
    config.optim.update(name="adamw", learning_rate=1e-4, warmup_steps=0, grad_clip_norm=0.0, weight_decay=0.01)
    config.training.ema_decays = ()
    return config, shape, args.batch or default_batch


def build_train_step(config, shape: tuple[int, ...], batch: int):
    """(the project's train step jitted with the state donated, a fresh train state, a batch of noise images
    with labels below `model.num_classes` (or 0)), built as `training/loop.py` builds them; shared by the
    benchmarks that time or inspect a train step. The parameters come from an RBG key in one jitted program,
    which compiles ~3x faster on XLA:CPU than threefry's (8 s for the small U-Net); their values do not matter."""
    import jax

    from diffusion_jax import objectives
    from diffusion_jax.training import optimizer
    from diffusion_jax.training import state as state_lib
    from diffusion_jax.training.setup import build_model, build_process
    from diffusion_jax.training.step import make_train_step

    graphdef, init = build_model(config, shape)
    tx = optimizer.make_optimizer(config.optim, 1000)
    lr = optimizer.learning_rate_schedule(config.optim, 1000)
    objective = objectives.build(config, graphdef, build_process(config), shape)
    step = jax.jit(make_train_step(graphdef, objective, tx, lr, config), donate_argnums=0)
    state = jax.jit(lambda key: state_lib.create(init(key), tx, 0, jax.random.key(2)))(jax.random.key(0, impl="rbg"))
    data = {
        "image": jax.random.normal(jax.random.key(1), (batch, *shape)),
        "label": jax.random.randint(jax.random.key(4), (batch,), 0, config.model.get("num_classes") or 1),
    }
    return step, state, data


def malloc_keep_pages() -> None:
    """mallopt(3): every thread on the main (brk) arena, no mmap'd chunks, never trim the heap top.

    glibc serves an allocation above M_MMAP_THRESHOLD (at most 32 MiB) with mmap and unmaps it on
    free, so a buffer allocated per call is faulted in page by page (and zeroed) on every call; a
    thread's non-main arena falls back to mmap for anything above its 64 MiB heap. Must run before
    the threads that allocate start (before JAX's backend).
    """
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8
    for param, value in ((m_arena_max, 1), (m_mmap_max, 0), (m_trim_threshold, 2**31 - 1)):
        if libc.mallopt(param, value) != 1:
            raise OSError(f"mallopt({param}, {value}) failed")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.malloc_keep:
        malloc_keep_pages()
    if not args.xla_default:
        from diffusion_jax.runtime import configure_xla_flags

        configure_xla_flags("dit" if args.model.startswith("dit") else "unet")  # as the entry point chooses
    import jax
    import jax.numpy as jnp
    import numpy as np

    from diffusion_jax import guidance, samplers
    from diffusion_jax.training.setup import build_model, build_process, model_apply

    config, shape, batch = build_config(args)
    sampling = args.mode in ("ddim", "dpm")
    reps = args.reps or (3 if sampling else 5)
    steps = args.steps or (50 if args.mode == "ddim" else 20)
    graphdef, init = build_model(config, shape)
    params = init(jax.random.key(0))
    schedule = build_process(config)
    x = jax.random.normal(jax.random.key(1), (batch, *shape))
    t = jnp.full((batch,), 500, jnp.int32)
    labels = jax.random.randint(jax.random.key(4), (batch,), 0, 10) if args.model == "dit-s2" else None

    if args.mode == "fwd":
        fn = jax.jit(lambda p, x, t, y: model_apply(graphdef, p, x, t, y))
        call_args = (params, x, t, labels)
    elif args.mode == "train":
        fn, state, batch_dict = build_train_step(config, shape, batch)
        call_args = (state, batch_dict)
    else:
        sampler = samplers.get(args.sampler or ("ddim" if args.mode == "ddim" else "dpm_solver++"))

        def sample(p, key, x_T, y):
            def model_fn(x_t, t, cond):
                return model_apply(graphdef, p, x_t, t, cond)

            if args.guidance_weight is None:
                return sampler(lambda x_t, t: model_fn(x_t, t, y), schedule, key, x_T, steps=steps)
            guided = guidance.classifier_free(model_fn, y, config.model.num_classes, args.guidance_weight)
            return sampler(guided, schedule, key, x_T, steps=steps)

        fn = jax.jit(sample, donate_argnums=2)  # x_T's buffer is reused for the chain's state
        call_args = (params, jax.random.key(3), x, labels)

    start = time.perf_counter()
    lowered = fn.lower(*call_args)
    trace_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    if args.dump_hlo:
        with open(args.dump_hlo, "w") as f:
            f.write(compiled.as_text())

    cost = compiled.cost_analysis() or {}  # a dict on jaxlib >= 0.10 (the project's floor)
    flops = float(cost.get("flops", 0.0))
    bytes_accessed = float(cost.get("bytes accessed", 0.0))
    if sampling:  # the scan body (one model call + update) is counted once
        flops *= steps
        bytes_accessed *= steps
    mem = compiled.memory_analysis()
    memory = (
        {
            k: getattr(mem, k, None)
            for k in (
                "argument_size_in_bytes",
                "output_size_in_bytes",
                "alias_size_in_bytes",
                "temp_size_in_bytes",
                "generated_code_size_in_bytes",
            )
        }
        if mem is not None
        else {}
    )

    if args.mode == "train":
        holder = [call_args[0]]

        def run():
            holder[0], metrics = compiled(holder[0], call_args[1])
            jax.block_until_ready(metrics["loss"])
    elif sampling:  # x_T is donated: a fresh copy per call

        def run():
            jax.block_until_ready(compiled(params, call_args[1], jnp.copy(x), labels))
    else:

        def run():
            jax.block_until_ready(compiled(*call_args))

    start = time.perf_counter()
    run()
    first_call_s = time.perf_counter() - start
    for _ in range(args.warmup - 1):
        run()
    if args.profile:
        jax.profiler.start_trace(args.profile, create_perfetto_trace=True)  # read by op_profile.py
    recs = time_reps(run, reps)
    if args.profile:
        jax.profiler.stop_trace()

    times = [r["wall"] for r in recs]
    clean = [r["wall"] for r in recs if r["other_load"] < CLEAN_OTHER_LOAD]
    median = statistics.median(times)
    median_clean = statistics.median(clean) if clean else None
    flops_per_image = flops / batch
    gflops = flops_per_image * batch / median / 1e9
    print(
        json.dumps(
            {
                "bench": "jax",
                "model": args.model,
                "mode": args.mode,
                "dtype": args.dtype,
                "batch": batch,
                "steps": steps if sampling else None,
                "sampler": args.sampler if sampling else None,
                "guidance_weight": args.guidance_weight,
                "remat": args.remat,
                "attention_impl": args.attention_impl,
                "xla_default": args.xla_default,
                "xla_flags": os.environ.get("XLA_FLAGS", ""),
                "ld_preload": os.environ.get("LD_PRELOAD", ""),
                "malloc_env": {k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "GLIBC_TUNABLES"))},
                "malloc_keep": args.malloc_keep,
                "params": int(sum(np.size(leaf) for leaf in jax.tree.leaves(params))),
                "trace_s": round(trace_s, 2),
                "compile_s": round(compile_s, 2),
                "first_call_s": round(first_call_s, 3),
                "time_s": {
                    "median": median,
                    "min": min(times),
                    "max": max(times),
                    "median_clean": median_clean,
                    "all": [round(v, 4) for v in times],
                },
                "images_per_s": {
                    "median": batch / median,
                    "min": batch / max(times),
                    "max": batch / min(times),
                    "median_clean": batch / median_clean if clean else None,
                },
                "n_clean_reps": len(clean),
                "other_load": [round(r["other_load"], 2) for r in recs],
                "flops_per_image": flops_per_image,
                "bytes_accessed_per_image": bytes_accessed / batch,
                "achieved_gflops": gflops,
                "peak_gflops": args.peak_gflops,
                "fraction_of_peak": gflops / args.peak_gflops,
                "memory": {**memory, "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024},
                "per_rep": {
                    "own_cpu_s": statistics.median(r["own_cpu"] for r in recs),
                    "sys_cpu_s": statistics.median(r["sys_cpu"] for r in recs),
                    "minflt": statistics.median(r["minflt"] for r in recs),
                },
                "versions": {
                    "jax": jax.__version__,
                    "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
                    "python": platform.python_version(),
                },
            }
        )
    )


if __name__ == "__main__":
    from diffusion_jax.runtime import reexec_with_huge_page_malloc

    # As the entry point does (a no-op where GLIBC_TUNABLES is set: GLIBC_TUNABLES=glibc.malloc.hugetlb=0
    # measures without it).
    reexec_with_huge_page_malloc()
    main()
