"""In-process A/B of the small U-Net's train step under GroupNorm/SiLU variants, interleaved.

    python benchmarks/ab_train_step.py [--model unet-small] [--rounds 5] [--reps 3] [--variants fused,plain,...]

Every variant's train step (throughput.py's: the project's `make_train_step`, AdamW, the state donated)
is compiled in one process, then the steps are timed round-robin, `--reps` calls each per round, so the
machine's drift (10-25% between processes here) hits all variants alike. Prints images/s, the ratio to
`plain`, compile seconds and XLA's temporary buffer per variant. The variants replace
`models.norm.GroupNorm.__call__` while the model is traced:

  fused       the project's: `norm.group_norm_act`, one op with the hand-written JVP
  plain       nnx.GroupNorm's formulation (single-pass statistic), scale-shift and SiLU as separate ops,
              differentiated by JAX: what the models ran before the fused op
  custom_vjp  the same fused forward with a hand-written VJP that stores only x and the [B, G] statistics
              and recomputes x̂ and SiLU' in the backward pass (faster here, but a custom VJP has no
              forward mode, which the likelihood, the conditional inpainting denoiser and JVP objectives need)
  no_norm     GroupNorm replaced by the identity (SiLU kept): an upper bound on what any GroupNorm can save
  no_silu     SiLU replaced by the identity (GroupNorm kept)
  no_norm_no_silu  both
"""

import argparse
import functools
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from diffusion_jax.models import norm


def plain(self, x, *, scale=None, shift=None, silu=False):
    b, h, w, c = x.shape
    xg = x.astype(jnp.float32).reshape(b, h * w, self.num_groups, c // self.num_groups)
    mean = xg.mean((1, 3), keepdims=True)
    var = jnp.maximum(jnp.square(xg).mean((1, 3), keepdims=True) - jnp.square(mean), 0.0)
    y = ((xg - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape) * self.scale[...] + self.bias[...]
    if scale is not None:
        y = y * (1 + scale[:, None, None]) + shift[:, None, None]
    return jax.nn.silu(y) if silu else y


def _vjp_forward(x, gamma, beta, film_scale, film_shift, groups, eps, silu):
    a, _, _ = norm._forward(x, gamma, beta, film_scale, film_shift, groups, eps)
    return a * jax.nn.sigmoid(a) if silu else a


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _custom_vjp_norm(x, gamma, beta, film_scale, film_shift, groups, eps, silu):
    return _vjp_forward(x, gamma, beta, film_scale, film_shift, groups, eps, silu)


def _custom_vjp_fwd(x, gamma, beta, film_scale, film_shift, groups, eps, silu):
    mean, rstd = norm._stats(x, groups, eps)
    return _vjp_forward(x, gamma, beta, film_scale, film_shift, groups, eps, silu), (
        x, gamma, beta, film_scale, film_shift, mean, rstd)


def _custom_vjp_bwd(groups, eps, silu, residuals, dy):
    x, gamma, beta, film_scale, film_shift, mean, rstd = residuals
    b, h, w, c = x.shape
    rstd_c = norm._per_channel(rstd, c)
    x_hat = (x - norm._per_channel(mean, c)) * rstd_c
    one_plus_s = 1.0 + film_scale
    g = dy
    if silu:
        a = (x_hat * gamma + beta) * one_plus_s[:, None, None, :] + film_shift[:, None, None, :]
        sig = jax.nn.sigmoid(a)
        g = g * sig * (1.0 + a * (1.0 - sig))
    p, q = g.sum(axis=(1, 2)), (g * x_hat).sum(axis=(1, 2))  # the two full-size reductions, [B, C]
    k = one_plus_s * gamma

    def group_mean(v):
        return norm._per_channel(v.reshape(b, groups, c // groups).mean(axis=2), c) / (h * w)

    dx = rstd_c * (k[:, None, None, :] * g - group_mean(k * p) - x_hat * group_mean(k * q))
    return dx, (one_plus_s * q).sum(axis=0), (one_plus_s * p).sum(axis=0), gamma * q + beta * p, p


_custom_vjp_norm.defvjp(_custom_vjp_fwd, _custom_vjp_bwd)


def custom_vjp(self, x, *, scale=None, shift=None, silu=False):
    zeros = jnp.zeros((x.shape[0], x.shape[-1]), jnp.float32)
    return _custom_vjp_norm(x, self.scale[...], self.bias[...], zeros if scale is None else scale,
                            zeros if shift is None else shift, self.num_groups, self.epsilon, silu)


def identity_norm(self, x, *, scale=None, shift=None, silu=False):
    return jax.nn.silu(x) if silu else x


def plain_no_silu(self, x, *, scale=None, shift=None, silu=False):
    return plain(self, x, scale=scale, shift=shift, silu=False)


def identity(self, x, *, scale=None, shift=None, silu=False):
    return x


VARIANTS = {
    "fused": norm.GroupNorm.__call__,
    "plain": plain,
    "custom_vjp": custom_vjp,
    "no_norm": identity_norm,
    "no_silu": plain_no_silu,
    "no_norm_no_silu": identity,
}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["unet-small", "unet-cifar"], default="unet-small")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--variants", default="fused,plain,custom_vjp,no_norm,no_silu,no_norm_no_silu")
    args = p.parse_args(argv)
    import throughput

    from diffusion_jax import objectives
    from diffusion_jax.training import optimizer
    from diffusion_jax.training import state as state_lib
    from diffusion_jax.training.setup import build_model, build_process
    from diffusion_jax.training.step import make_train_step

    config, shape, batch = throughput.build_config(throughput.parse_args(["--model", args.model]))
    names = args.variants.split(",")
    runs, info, original = {}, {}, norm.GroupNorm.__call__
    for name in names:
        norm.GroupNorm.__call__ = VARIANTS[name]
        try:
            graphdef, init = build_model(config, shape)
            tx = optimizer.make_optimizer(config.optim, 1000)
            lr = optimizer.learning_rate_schedule(config.optim, 1000)
            objective = objectives.build(config, graphdef, build_process(config), shape)
            step = jax.jit(make_train_step(graphdef, objective, tx, lr, config), donate_argnums=0)
            state = state_lib.create(init(jax.random.key(0)), tx, 0, jax.random.key(2))
            batch_dict = {"image": jax.random.normal(jax.random.key(1), (batch, *shape)),
                          "label": jnp.zeros((batch,), jnp.int32)}
            start = time.perf_counter()
            compiled = step.lower(state, batch_dict).compile()
            info[name] = (time.perf_counter() - start, compiled.memory_analysis().temp_size_in_bytes / 2**20)
        finally:
            norm.GroupNorm.__call__ = original
        holder = [state]

        def run(compiled=compiled, holder=holder, batch_dict=batch_dict):
            holder[0], metrics = compiled(holder[0], batch_dict)
            jax.block_until_ready(metrics["loss"])

        run(), run()
        runs[name] = run
        print(f"compiled {name}: {info[name][0]:.1f} s, temp {info[name][1]:.0f} MB", file=sys.stderr, flush=True)
    times = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            for _ in range(args.reps):
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    reference = statistics.median(times["plain"]) if "plain" in times else None
    print(f"{args.model} train step, batch {batch}, {args.rounds} rounds x {args.reps} reps, interleaved")
    print("| variant | images/s | step (ms) | vs plain | compile (s) | XLA temp (MB) |\n|---|---|---|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        ratio = f"{reference / median:.3f}x" if reference else "-"
        print(f"| {name} | {batch / median:.1f} | {1e3 * median:.0f} | {ratio} | {info[name][0]:.1f} | "
              f"{info[name][1]:.0f} |")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from diffusion_jax.runtime import configure_xla_flags, reexec_with_huge_page_malloc

    reexec_with_huge_page_malloc()
    configure_xla_flags("unet")
    main()
