"""U-Net throughput on this machine: forward, train step and 50-step DDIM, images/s.

Mirrors `../shared/bench/torch_unet.py` (diffusers UNet2DModel) layout for layout, so the
two can be run side by side (see `benchmarks/README.md`):

    python benchmarks/unet_throughput.py --config small --mode train [--xla-default]

  small: 16x16x1, channels 32-64-64, 2 res blocks, attention at 8x8 (+ the middle block)
  cifar: Ho et al.'s CIFAR-10 U-Net, 35.7M parameters

train runs the project's own jitted train step (donated state, AdamW, L_simple);
ddim the project's `ddim_sample` as one jitted `lax.scan`. `--xla-default` keeps jaxlib's
default XLA:CPU fusions instead of the flags `diffusion_jax.runtime` sets.
Prints one JSON line.
"""

import argparse
import json
import statistics
import sys
import time


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=["small", "cifar"], default="small")
    p.add_argument("--mode", choices=["fwd", "train", "ddim"], default="train")
    p.add_argument("--batch", type=int, default=None, help="default: 64 small, 16 cifar")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=None, help="default 5 (ddim: 3)")
    p.add_argument("--xla-default", action="store_true", help="do not apply diffusion_jax.runtime's XLA flags")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if not args.xla_default:
        from diffusion_jax.runtime import configure_xla_flags

        configure_xla_flags()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from diffusion_jax.config import base_config
    from diffusion_jax.samplers import ddim_sample
    from diffusion_jax.training import optimizer
    from diffusion_jax.training import state as state_lib
    from diffusion_jax.training.setup import build_model, build_schedule, model_apply
    from diffusion_jax.training.step import make_train_step

    config = base_config()
    if args.config == "small":
        config.data.image_size = 16
        shape = (16, 16, 1)
        config.model.update(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(8,))
    else:
        shape = (32, 32, 3)
    config.model.dropout = 0.0
    config.optim.update(name="adamw", learning_rate=1e-4, warmup_steps=0, grad_clip_norm=0.0, weight_decay=0.01)
    config.training.ema_decays = ()
    batch = args.batch or (64 if args.config == "small" else 16)
    reps = args.reps or (3 if args.mode == "ddim" else 5)

    graphdef, init = build_model(config, shape)
    params = init(jax.random.key(0))
    schedule = build_schedule(config)
    x = jax.random.normal(jax.random.key(1), (batch, *shape))
    t = jnp.full((batch,), 500, jnp.int32)

    if args.mode == "fwd":
        fwd = jax.jit(lambda p, x, t: model_apply(graphdef, p, x, t))

        def run():
            jax.block_until_ready(fwd(params, x, t))
    elif args.mode == "train":
        tx = optimizer.make_optimizer(config.optim, 1000)
        lr = optimizer.learning_rate_schedule(config.optim, 1000)
        step = jax.jit(make_train_step(graphdef, schedule, tx, lr, config), donate_argnums=0)
        holder = [state_lib.create(params, tx, 0, jax.random.key(2))]
        batch_dict = {"image": x, "label": jnp.zeros((batch,), jnp.int32)}

        def run():
            holder[0], metrics = step(holder[0], batch_dict)
            jax.block_until_ready(metrics["loss"])
    else:
        sample = jax.jit(
            lambda p, key, x_T: ddim_sample(lambda x_t, t: model_apply(graphdef, p, x_t, t), schedule, key, x_T,
                                            steps=args.steps)
        )

        def run():
            jax.block_until_ready(sample(params, jax.random.key(3), x))

    start = time.perf_counter()
    run()
    compile_s = time.perf_counter() - start
    for _ in range(args.warmup - 1):
        run()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
        print(f"rep {len(times)}: {times[-1]:.3f}s", file=sys.stderr)
    median = statistics.median(times)
    print(json.dumps({
        "bench": "jax_unet", "config": args.config, "mode": args.mode, "batch": batch,
        "steps": args.steps if args.mode == "ddim" else None, "xla_default": args.xla_default,
        "params": int(sum(np.size(leaf) for leaf in jax.tree.leaves(params))),
        "first_call_s": round(compile_s, 2),
        "time_s": {"median": median, "min": min(times), "max": max(times), "all": times},
        "images_per_s": {"median": batch / median, "min": batch / max(times), "max": batch / min(times)},
        "versions": {"jax": jax.__version__},
    }))


if __name__ == "__main__":
    main()
