"""Is the GPU training path healthy? One run, a few minutes, every answer printed.

    python benchmarks/gpu_check.py            # on the GPU machine: full sizes, ~3-5 min (estimate; mostly compiling)
    python benchmarks/gpu_check.py --small    # anywhere; the automatic choice on CPU: tiny models, well under a minute

`--small` / `--full` override the automatic choice (full on an accelerator, small on CPU). The train steps are
built as `benchmarks/throughput.py --mode train` builds them: the project's `make_train_step` (AdamW, L_simple,
no EMA), `jax.jit` with the state donated, `state.create`; each is compiled ahead of time, run --warmup times,
then timed --reps times (median, each call waited for).

Sections (each catches its own exception and reports "failed" with the error, so one failure hides nothing else):
  dit_train         DiT-XL/2, bf16 compute (float32 parameters), 32x32x4 latents (256 px images), 1000 classes,
                    batch 64 (--dit-batch); small: DiT-S/2 on 8x8x4, batch 2. Trace and compile s, step s,
                    images/s, FLOPs per step (XLA's cost analysis of the compiled program), achieved TFLOP/s, and
                    MFU = achieved / the device's dense bf16 peak (PEAK_BF16_FLOPS by device kind, or --peak-tflops;
                    null with the reason on CPU or an unknown device). Target: MFU >= 50% on H100/H200.
  unet_train_*      the CIFAR-10 U-Net of throughput.py (`unet-cifar`, 35.7M parameters), 32x32x3, batch 128
                    (--unet-batch), float32 and bfloat16 compute; small: ch=8, one level, 16x16x1, batch 2. The same
                    fields; no target (MFU only for bf16, against the bf16 peak).
  attention         does the DiT forward with model.attention_impl=None (JAX's choice) contain cuDNN's fused
                    attention (a custom call `__cudnn$fmha*`), does section 1's train step, and does
                    attention_impl='cudnn' compile (and contain it)? Passed when 'cudnn' compiles to the call;
                    whether the default takes it is reported, not judged (jax 0.10's None is XLA's attention;
                    --dit-attention cudnn times section 1 with cuDNN's). Not applicable off NVIDIA GPUs: there it
                    checks that the XLA attention path compiles.
  host_sync         section 1's compiled step, --sync-steps K more steady-state steps on a batch already on the
                    device, inside jax.transfer_guard("disallow_explicit") (stricter than "disallow", which lets
                    explicit device_put/device_get through): any host<->device transfer raises (on the CPU, whose
                    device memory is the host's, only host-to-device ones). Also fails when the compiled program
                    holds host callbacks, infeed/outfeed or send/recv. Reports dispatch_s (K calls
                    without waiting) against total_s (until the last result is ready): a step that syncs with the
                    host shows dispatch ~ total; on a GPU at full size dispatch < half of total or the section warns.
                    loop_pattern_s runs K steps as training/loop.py does (after queuing step n it waits for step
                    n-1, `_Metrics.add`: a wait, not a transfer), which should match total_s.
                    Not covered: the loop's own host traffic, which is by design: each batch's device_put by the data
                    iterator, the metrics' device_get every training.log_every steps (`_Metrics.drain`, one step
                    behind), checkpoints and samples; nor the loop's sharded `experiment.jit_train_step` (the step
                    here is the plain jax.jit of throughput.py, on one device).
  env               jax, jaxlib, flax versions, backend, device kind and count, XLA_FLAGS.

Output: progress on stderr; a markdown table (section | status | result | target) on stdout, then one JSON line
with every number (the last line of stdout). Statuses: passed, failed (the one-line error), warning, not
applicable, skipped. The exit code is 1 when a section failed. MFU here is XLA-counted FLOPs over the datasheet
peak: a cuDNN custom call may count no FLOPs, so `flops_per_step_unoptimized` (the cost analysis of the program
before XLA's passes) is reported beside it.
"""

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from importlib import metadata
from typing import Any

# Dense (no sparsity) bf16 peak FLOP/s of one device, by case-insensitive substring of `device_kind`; the
# first match wins, so the more specific names come first (an "L40S" is not an "L4").
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
)
MFU_TARGET = 0.5  # on H100 / H200
MFU_TARGET_KINDS = ("H100", "H200")
SIZES = {
    "full": dict(
        dit=dict(name="DiT-XL/2", num_classes=1000),
        dit_shape=(32, 32, 4),
        dit_batch=64,
        unet=dict(name="unet"),  # base_config's model: Ho et al.'s CIFAR-10 U-Net
        unet_shape=(32, 32, 3),
        unet_batch=128,
        warmup=2,
        reps=10,
    ),
    "small": dict(
        dit=dict(name="DiT-S/2", num_classes=10),
        dit_shape=(8, 8, 4),
        dit_batch=2,
        unet=dict(name="unet", ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=()),  # fast to compile
        unet_shape=(16, 16, 1),
        unet_batch=2,
        warmup=1,
        reps=2,
    ),
}
CUDNN_FMHA = re.compile(r"__cudnn\$fmha\w*")  # custom call targets (fused_attention_stablehlo.py's _custom_name_maps)
HOST_OPS = re.compile(r'custom_call_target="([^"]*callback[^"]*)"|\b(infeed|outfeed|send|recv)\(')


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--small", dest="size", action="store_const", const="small", help="tiny models (CPU default)")
    size.add_argument("--full", dest="size", action="store_const", const="full", help="full sizes (GPU default)")
    p.add_argument("--dit-batch", type=int, default=None, help="default: 64 (small: 2)")
    p.add_argument("--unet-batch", type=int, default=None, help="default: 128 (small: 2)")
    p.add_argument(
        "--dit-attention",
        choices=["default", "xla", "cudnn"],
        default="default",
        help="section 1's model.attention_impl (default: None, JAX's choice)",
    )
    p.add_argument("--warmup", type=int, default=None, help="untimed calls after compiling (default: 2; small: 1)")
    p.add_argument("--reps", type=int, default=None, help="timed calls (default: 10; small: 2)")
    p.add_argument("--sync-steps", type=int, default=5, help="K, the steps of the host_sync check")
    p.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak of one device (default: by device kind)")
    return p.parse_args(argv)


def cpu_only() -> bool:
    """Whether JAX can only run on the CPU, decided before its backend starts: JAX_PLATFORMS, else no GPU/TPU plugin."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return platforms == "cpu"
    names = {(d.metadata["Name"] or "").lower().replace("_", "-") for d in metadata.distributions()}
    return not any(n.startswith(("jax-cuda", "jax-rocm", "libtpu")) for n in names)


def peak_flops(device_kind: str, backend: str, override_tflops: float | None) -> tuple[float | None, str]:
    """(bf16 peak FLOP/s of one device or None, where it comes from or why there is none)."""
    if override_tflops:
        return override_tflops * 1e12, "--peak-tflops"
    for key, flops in PEAK_BF16_FLOPS:
        if key.lower() in device_kind.lower():
            return flops, f"datasheet dense bf16 ({key})"
    return None, f"no bf16 peak known for device kind {device_kind!r} (backend {backend}); pass --peak-tflops"


def build_config(model: dict, image_size: int) -> Any:
    """throughput.py's `build_config`: a DiT's own model dict, or base_config's U-Net updated by `model`."""
    import ml_collections

    from diffusion_jax.config import base_config

    config = base_config()
    config.data.image_size = image_size
    if model["name"].lower().startswith("dit"):
        config.model = ml_collections.ConfigDict(dict(learn_sigma=False, remat=False, **model))
    else:
        config.model.update(dropout=0.0, **model)  # diffusers' UNet2DModel has no dropout
    config.optim.update(name="adamw", learning_rate=1e-4, warmup_steps=0, grad_clip_norm=0.0, weight_decay=0.01)
    config.training.ema_decays = ()
    return config


def build_train_step(model: dict, shape: tuple[int, int, int], batch: int) -> tuple[Any, Any, dict]:
    """(jitted train step with the state donated, a fresh state, a batch on the device): throughput.py's."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # throughput.py beside this file
    from throughput import build_train_step as throughput_train_step

    return throughput_train_step(build_config(model, shape[0]), shape, batch)


def time_step(compiled: Callable, state: Any, data: dict, warmup: int, reps: int) -> tuple[Any, list[float]]:
    """(the state after warmup + reps calls, the wall time of each timed call, waited for)."""
    import jax

    times = []
    for i in range(warmup + reps):
        start = time.perf_counter()
        state, metrics = compiled(state, data)
        jax.block_until_ready(metrics)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return state, times


def bench_train_step(
    model: dict, shape: tuple[int, int, int], batch: int, args: argparse.Namespace, peak: tuple[float | None, str]
) -> tuple[dict, Callable, Any, dict]:
    """Compiles and times one train step: (its report, the compiled step, the latest state, the batch)."""
    step, state, data = build_train_step(model, shape, batch)
    start = time.perf_counter()
    lowered = step.lower(state, data)
    trace_s = time.perf_counter() - start
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start - trace_s
    flops = float((compiled.cost_analysis() or {}).get("flops", 0.0))
    state, times = time_step(compiled, state, data, args.warmup, args.reps)
    step_s = statistics.median(times)
    achieved = flops / step_s
    peak_value, peak_source = peak
    bf16 = model.get("dtype") == "bfloat16"
    mfu = achieved / peak_value if peak_value and bf16 else None
    report = {
        "status": "passed",
        "model": model["name"],
        "dtype": model.get("dtype"),
        "shape": list(shape),
        "batch": batch,
        "trace_s": round(trace_s, 2),
        "compile_s": round(compile_s, 2),
        "step_s": step_s,
        "step_s_all": [round(t, 5) for t in times],
        "images_per_s": batch / step_s,
        "flops_per_step": flops,
        "flops_per_step_unoptimized": float((lowered.cost_analysis() or {}).get("flops", 0.0)),
        "achieved_tflops": achieved / 1e12,
        "peak_tflops": peak_value / 1e12 if peak_value else None,
        "mfu": mfu,
        "mfu_reason": peak_source if bf16 else "float32 compute: MFU is against the bf16 peak",
    }
    return report, compiled, state, data


def check_dit_train(ctx: dict, args: argparse.Namespace) -> dict:
    """Section 1: the DiT train step's speed and MFU; keeps its compiled step and state for sections 3 and 4."""
    impl = None if args.dit_attention == "default" else args.dit_attention
    model = dict(ctx["sizes"]["dit"], dtype="bfloat16", attention_impl=impl)
    report, compiled, state, data = bench_train_step(
        model, ctx["sizes"]["dit_shape"], args.dit_batch, args, ctx["peak"]
    )
    ctx["dit_step"], ctx["dit_hlo"] = (compiled, state, data), compiled.as_text()
    report["attention_impl"] = impl
    kind = ctx["env"]["device_kind"]
    if any(k in kind for k in MFU_TARGET_KINDS) and report["mfu"] is not None:
        report["meets_target"] = report["mfu"] >= MFU_TARGET
    else:
        report["meets_target"] = None
    return report


def check_unet_train(ctx: dict, args: argparse.Namespace, dtype: str) -> dict:
    """Section 2: the U-Net train step's speed in `dtype` compute."""
    model = dict(ctx["sizes"]["unet"], dtype=dtype)
    return bench_train_step(model, ctx["sizes"]["unet_shape"], args.unet_batch, args, ctx["peak"])[0]


def check_attention(ctx: dict, args: argparse.Namespace) -> dict:
    """Section 3: which attention the DiT compiles to (cuDNN's fused custom call or XLA's)."""
    import jax
    import jax.numpy as jnp

    from diffusion_jax.training.setup import build_model, model_apply

    sizes, batch = ctx["sizes"], args.dit_batch

    def fmha_calls(impl: str | None) -> tuple[list[str], list[str]]:
        """The cuDNN attention calls of the DiT forward: (in the optimized HLO, in the lowered StableHLO)."""
        config = build_config(dict(sizes["dit"], dtype="bfloat16", attention_impl=impl), sizes["dit_shape"][0])
        graphdef, init = build_model(config, sizes["dit_shape"])
        params = jax.eval_shape(init, jax.random.key(0))  # shapes only: nothing allocated
        x = jax.ShapeDtypeStruct((batch, *sizes["dit_shape"]), jnp.float32)
        t = y = jax.ShapeDtypeStruct((batch,), jnp.int32)
        fwd = jax.jit(lambda p, x, t, y: model_apply(graphdef, p, x, t, y))
        lowered = fwd.lower(params, x, t, y)
        optimized = lowered.compile().as_text()
        return sorted(set(CUDNN_FMHA.findall(optimized))), sorted(set(CUDNN_FMHA.findall(lowered.as_text())))

    default, default_lowered = fmha_calls(None)
    report: dict[str, Any] = {
        "default_fmha_calls": default,  # what runs
        "default_fmha_in_lowered": default_lowered,  # what JAX emitted
        "default_uses_cudnn": bool(default),
    }
    if "dit_hlo" in ctx:
        train = sorted(set(CUDNN_FMHA.findall(ctx["dit_hlo"])))
        report.update(train_step_fmha_calls=train, train_step_uses_cudnn=bool(train))
    backend = ctx["env"]["backend"]
    nvidia = "cuda" in ctx["env"]["platform_version"].lower() or "nvidia" in ctx["env"]["device_kind"].lower()
    if backend != "gpu" or not nvidia:
        return {"status": f"not applicable (backend {backend})", "xla_path_compiled": True, **report}
    try:
        fused, fused_lowered = fmha_calls("cudnn")
        report.update(
            cudnn_compiles=True, cudnn_fmha_calls=fused, cudnn_fmha_in_lowered=fused_lowered, cudnn_error=None
        )
    except Exception as e:  # noqa: BLE001 - the failure is the finding
        report.update(cudnn_compiles=False, cudnn_fmha_calls=[], cudnn_fmha_in_lowered=[], cudnn_error=_one_line(e))
    ok = report["cudnn_compiles"] and (report["cudnn_fmha_calls"] or report["cudnn_fmha_in_lowered"])
    report["status"] = "passed" if ok else "failed"
    return report


def check_host_sync(ctx: dict, args: argparse.Namespace) -> dict:
    """Section 4: K steady-state steps of section 1's step do no host<->device transfer and dispatch asynchronously."""
    import jax

    if "dit_step" not in ctx:
        return {"status": "skipped", "error": "needs section 1's compiled step (dit_train failed)"}
    compiled, state, data = ctx.pop("dit_step")
    host_ops = sorted({a or b for a, b in HOST_OPS.findall(ctx["dit_hlo"])})
    k = args.sync_steps
    with jax.transfer_guard("disallow_explicit"):
        start = time.perf_counter()
        for _ in range(k):
            state, metrics = compiled(state, data)
        dispatch_s = time.perf_counter() - start
        jax.block_until_ready(metrics)
        total_s = time.perf_counter() - start
        start, previous = time.perf_counter(), None
        for _ in range(k):  # training/loop.py's pattern: queue step n, then wait for step n-1
            state, metrics = compiled(state, data)
            if previous is not None:
                jax.block_until_ready(previous)
            previous = metrics
        jax.block_until_ready(metrics)
        loop_pattern_s = time.perf_counter() - start
    loss = float(jax.device_get(metrics["loss"]))  # outside the guard, as the loop's drain
    ctx["dit_step"] = (compiled, state, data)
    judge_async = ctx["env"]["backend"] != "cpu" and ctx["size"] == "full"
    async_ok = dispatch_s < 0.5 * total_s if judge_async else None
    status = "failed" if host_ops else ("warning" if async_ok is False else "passed")
    return {
        "status": status,
        "steps": k,
        "transfer_guard": "disallow_explicit: no transfer",
        "host_ops_in_step": host_ops,
        "dispatch_s": dispatch_s,
        "total_s": total_s,
        "dispatch_fraction": dispatch_s / total_s,
        "async_dispatch_ok": async_ok,
        "loop_pattern_s": loop_pattern_s,
        "loss": loss,
        "images_per_s": k * args.dit_batch / total_s,
    }


def environment() -> dict:
    """Section 5: versions, backend, devices, XLA_FLAGS."""
    import flax
    import jax
    import jaxlib

    device = jax.devices()[0]
    return {
        "status": "passed",
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "python": platform.python_version(),
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "platform_version": getattr(device.client, "platform_version", ""),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:400]


def run_section(name: str, fn: Callable[..., dict], *fn_args: Any) -> dict:
    """fn(*fn_args) with its wall time; an exception becomes {'status': 'failed', 'error': its first line}."""
    print(f"[gpu_check] {name} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        result = fn(*fn_args)
    except Exception as e:  # noqa: BLE001 - one failing section must not hide the others
        traceback.print_exc(file=sys.stderr)
        result = {"status": "failed", "error": _one_line(e)}
    result["section_s"] = round(time.perf_counter() - start, 2)
    print(f"[gpu_check] {name}: {result['status']} ({result['section_s']} s)", file=sys.stderr, flush=True)
    return result


def _train_summary(r: dict) -> str:
    mfu = f"MFU {100 * r['mfu']:.1f}%" if r.get("mfu") is not None else f"MFU null ({r['mfu_reason']})"
    return (
        f"{r['model']} {r['dtype']} B={r['batch']}: {r['images_per_s']:.1f} img/s, {1e3 * r['step_s']:.1f} ms/step, "
        f"{r['flops_per_step'] / 1e12:.3g} TFLOP/step, {r['achieved_tflops']:.3g} TFLOP/s, {mfu}, "
        f"compile {r['compile_s']:.1f} s"
    )


def markdown_table(sections: dict[str, dict]) -> str:
    rows = ["| section | status | result | target |", "|---|---|---|---|"]
    for name, r in sections.items():
        target = ""
        if "error" in r:
            result = r["error"]
        elif name == "dit_train":
            result = _train_summary(r)
            verdict = {True: "met", False: "NOT met", None: "not judged here"}[r["meets_target"]]
            target = f"MFU >= {MFU_TARGET:.0%} on H100/H200: {verdict}"
        elif name.startswith("unet_train"):
            result = _train_summary(r)
        elif name == "attention":
            result = (
                f"default uses cuDNN fMHA: fwd {r['default_uses_cudnn']}, train step {r.get('train_step_uses_cudnn')}"
            )
            result += f"; 'cudnn' compiles: {r['cudnn_compiles']}" if "cudnn_compiles" in r else "; XLA path compiled"
            target = "'cudnn' compiles to __cudnn$fmha* (GPU)"
        elif name == "host_sync":
            result = (
                f"{r['steps']} steps, no transfer; host ops in step: {r['host_ops_in_step'] or 'none'}; dispatch "
                f"{1e3 * r['dispatch_s']:.1f} ms of {1e3 * r['total_s']:.1f} ms; loop pattern "
                f"{1e3 * r['loop_pattern_s']:.1f} ms"
            )
            target = "no transfer, no host ops; GPU: dispatch < 50% of total"
        else:
            result = (
                f"jax {r['jax']}, jaxlib {r['jaxlib']}, flax {r['flax']}; {r['backend']}: {r['device_count']} x "
                f"{r['device_kind']}; XLA_FLAGS={r['xla_flags']!r}"
            )
        rows.append(f"| {name} | {r['status']} | {result} | {target} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    """Runs every section, prints the table and the JSON line, and returns the JSON's dict."""
    started = time.perf_counter()
    args = parse_args(argv)
    if cpu_only():  # XLA reads its flags at backend start, so one choice for the process: the DiT's, whose
        from diffusion_jax.runtime import configure_xla_flags  # small step runs ~2x faster with XLA's default

        configure_xla_flags(SIZES["small"]["dit"]["name"])  # (runtime.py sets nothing for a DiT)

    ctx: dict[str, Any] = {}
    env = run_section("env", environment)
    if env["status"] != "passed":  # no JAX backend: nothing else can run
        ctx["env"] = {"backend": "unknown", "device_kind": "unknown", "platform_version": ""}
    else:
        ctx["env"] = env
    size = args.size or ("small" if ctx["env"]["backend"] == "cpu" else "full")
    sizes = ctx["sizes"] = SIZES[size]
    ctx["size"] = size
    args.dit_batch = args.dit_batch or sizes["dit_batch"]
    args.unet_batch = args.unet_batch or sizes["unet_batch"]
    args.warmup = sizes["warmup"] if args.warmup is None else args.warmup
    args.reps = args.reps or sizes["reps"]
    ctx["peak"] = peak_flops(ctx["env"]["device_kind"], ctx["env"]["backend"], args.peak_tflops)

    sections = {"dit_train": run_section("dit_train", check_dit_train, ctx, args)}
    sections["host_sync"] = run_section("host_sync", check_host_sync, ctx, args)
    sections["attention"] = run_section("attention", check_attention, ctx, args)
    ctx.pop("dit_step", None)  # frees the DiT's state before the U-Nets
    ctx.pop("dit_hlo", None)
    for dtype in ("float32", "bfloat16"):
        sections[f"unet_train_{dtype}"] = run_section(f"unet_train_{dtype}", check_unet_train, ctx, args, dtype)
    order = ("dit_train", "unet_train_float32", "unet_train_bfloat16", "attention", "host_sync")
    sections = {name: sections[name] for name in order} | {"env": env}

    result = {
        "gpu_check": 1,
        "size": size,
        "ok": all(r["status"] != "failed" for r in sections.values()),
        "wall_s": round(time.perf_counter() - started, 2),
        "sections": sections,
    }
    print(f"\n## gpu_check ({size} sizes, {result['wall_s']} s)\n\n{markdown_table(sections)}\n", flush=True)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
