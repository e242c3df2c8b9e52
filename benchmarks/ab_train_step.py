"""In-process A/B of the small U-Net's train step under GroupNorm/SiLU variants, interleaved.

    python benchmarks/ab_train_step.py [--model unet-small] [--rounds 5] [--reps 3] [--variants fused,plain,...]

Every variant's train step (throughput.py's: the project's `make_train_step`, AdamW, the state donated)
is compiled in one process, then the steps are timed round-robin, `--reps` calls each per round, so the
machine's drift (10-25% between processes here) hits all variants alike. Prints images/s, the ratio to
`plain`, compile seconds and XLA's temporary buffer per variant. The variants replace
`models.norm.GroupNorm.__call__` (or, for `broadcast`, `models.bias.broadcast_channels`) while the model is traced:

  plain       the project's `models.norm.GroupNorm`: nnx.GroupNorm's formulation (single-pass statistic),
              scale-shift and SiLU as separate ops, differentiated by JAX
  fused_jvp   one op a' = A x + B with per-(example, channel) coefficients, then SiLU, with a hand-written
              JVP written so that its transpose reduces the full-size arrays only twice (P = Σ_hw g',
              Q = Σ_hw g' x̂, every parameter cotangent from them on [B, C]); forward and reverse mode
  custom_vjp  the same fused forward with a hand-written VJP that stores only x and the [B, G] statistics
              and recomputes x̂ and SiLU' in the backward pass (a custom VJP has no forward mode, which
              the likelihood, the conditional inpainting denoiser and JVP objectives need)
  no_norm     GroupNorm replaced by the identity (SiLU kept): an upper bound on what any GroupNorm can save
  no_silu     SiLU replaced by the identity (GroupNorm kept)
  no_norm_no_silu  both
  broadcast   every per-channel bias, γ and β (`models.bias.broadcast_channels`) a plain `broadcast_to`, whose
              gradient XLA:CPU computes as a reduce-window over the leading axes instead of a matvec (the
              library's form before 2026-12-07)
"""

import argparse
import functools
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from diffusion_jax.models import bias, norm

# --- the fused forms measured against the library's plain GroupNorm (models/norm.py) ---------------------------

def _stats(x: jax.Array, groups: int, eps: float) -> tuple[jax.Array, jax.Array]:
    """x [B, H, W, C] -> (mean, rstd), each [B, G] float32."""
    b, h, w, c = x.shape
    xg = x.astype(jnp.float32).reshape(b, h * w, groups, c // groups)
    mean = xg.mean(axis=(1, 3))
    mean_sq = jnp.square(xg).mean(axis=(1, 3))
    return mean, jax.lax.rsqrt(jnp.maximum(mean_sq - jnp.square(mean), 0.0) + eps)


def _per_channel(v: jax.Array, channels: int) -> jax.Array:
    """[B, G] -> [B, 1, 1, C]: each group's value on its C/G channels."""
    b, g = v.shape
    return jnp.repeat(v, channels // g, axis=1).reshape(b, 1, 1, channels)


def _forward(x, gamma, beta, film_scale, film_shift, groups, eps):
    """The primal: (a' [B, H, W, C] float32 before the activation, x̂, and rstd per channel [B, 1, 1, C])."""
    c = x.shape[-1]
    mean, rstd = _stats(x, groups, eps)
    mean_c, rstd_c = _per_channel(mean, c), _per_channel(rstd, c)
    one_plus_s = (1.0 + film_scale)[:, None, None, :]  # [B, 1, 1, C]
    coef = rstd_c * gamma * one_plus_s
    offset = (beta - mean_c * rstd_c * gamma) * one_plus_s + film_shift[:, None, None, :]
    x32 = x.astype(jnp.float32)
    return x32 * coef + offset, (x32 - mean_c) * rstd_c, rstd_c


@functools.partial(jax.custom_jvp, nondiff_argnums=(5, 6, 7, 8))
def _fused_jvp_norm(x, gamma, beta, film_scale, film_shift, groups, eps, silu, out_dtype):
    a, _, _ = _forward(x, gamma, beta, film_scale, film_shift, groups, eps)
    return (a * jax.nn.sigmoid(a) if silu else a).astype(out_dtype)


@_fused_jvp_norm.defjvp
def _fused_jvp_norm_jvp(groups, eps, silu, out_dtype, primals, tangents):
    """The tangent, written so that its transpose (the VJP JAX derives for reverse mode) reduces the full-size
    arrays only twice, to P = Σ_hw g' and Q = Σ_hw g' x̂ (module docstring): every [B, C] coefficient multiplies
    a broadcast, so both reductions are shared by all the parameter and input cotangents."""
    x, gamma, beta, film_scale, film_shift = primals
    dx, d_gamma, d_beta, d_scale, d_shift = tangents
    b, h, w, c = x.shape
    a, x_hat, rstd_c = _forward(x, gamma, beta, film_scale, film_shift, groups, eps)
    one_plus_s = 1.0 + film_scale  # [B, C]
    k = one_plus_s * gamma * rstd_c[:, 0, 0, :]  # [B, C]: d a' / d x away from the statistics

    def group_mean(v: jax.Array) -> jax.Array:  # [B, C] -> [B, C]: the mean of each group's channels
        return jnp.repeat(v.reshape(b, groups, c // groups).mean(axis=2), c // groups, axis=1)

    dx = dx.astype(jnp.float32)
    m1 = group_mean(dx.sum(axis=(1, 2))) / (h * w)  # [B, C]: d μ / rstd-free
    m2 = group_mean((dx * x_hat).sum(axis=(1, 2))) / (h * w)  # [B, C]
    u = one_plus_s * d_gamma + gamma * d_scale - k * m2  # [B, C], multiplies x̂
    v = one_plus_s * d_beta + beta * d_scale + d_shift - k * m1  # [B, C]
    da = k[:, None, None, :] * dx + x_hat * u[:, None, None, :] + v[:, None, None, :]
    if silu:
        sig = jax.nn.sigmoid(a)
        y = a * sig
        da = da * (sig * (1.0 + a * (1.0 - sig)))  # SiLU'(a) = σ(a)(1 + a(1 - σ(a)))
    else:
        y = a
    return y.astype(out_dtype), da.astype(out_dtype)



def fused_jvp(self, x, *, scale=None, shift=None, silu=False):
    zeros = jnp.zeros((x.shape[0], x.shape[-1]), jnp.float32)
    return _fused_jvp_norm(x, self.scale[...], self.bias[...], zeros if scale is None else scale,
                           zeros if shift is None else shift, self.num_groups, self.epsilon, silu, jnp.dtype(x.dtype))


def _vjp_forward(x, gamma, beta, film_scale, film_shift, groups, eps, silu):
    a, _, _ = _forward(x, gamma, beta, film_scale, film_shift, groups, eps)
    return a * jax.nn.sigmoid(a) if silu else a


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _custom_vjp_norm(x, gamma, beta, film_scale, film_shift, groups, eps, silu):
    return _vjp_forward(x, gamma, beta, film_scale, film_shift, groups, eps, silu)


def _custom_vjp_fwd(x, gamma, beta, film_scale, film_shift, groups, eps, silu):
    mean, rstd = _stats(x, groups, eps)
    return _vjp_forward(x, gamma, beta, film_scale, film_shift, groups, eps, silu), (
        x, gamma, beta, film_scale, film_shift, mean, rstd)


def _custom_vjp_bwd(groups, eps, silu, residuals, dy):
    x, gamma, beta, film_scale, film_shift, mean, rstd = residuals
    b, h, w, c = x.shape
    rstd_c = _per_channel(rstd, c)
    x_hat = (x - _per_channel(mean, c)) * rstd_c
    one_plus_s = 1.0 + film_scale
    g = dy
    if silu:
        a = (x_hat * gamma + beta) * one_plus_s[:, None, None, :] + film_shift[:, None, None, :]
        sig = jax.nn.sigmoid(a)
        g = g * sig * (1.0 + a * (1.0 - sig))
    p, q = g.sum(axis=(1, 2)), (g * x_hat).sum(axis=(1, 2))  # the two full-size reductions, [B, C]
    k = one_plus_s * gamma

    def group_mean(v):
        return _per_channel(v.reshape(b, groups, c // groups).mean(axis=2), c) / (h * w)

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
    return VARIANTS["plain"](self, x, scale=scale, shift=shift, silu=False)


def identity(self, x, *, scale=None, shift=None, silu=False):
    return x


VARIANTS = {
    "plain": norm.GroupNorm.__call__,
    "fused_jvp": fused_jvp,
    "custom_vjp": custom_vjp,
    "no_norm": identity_norm,
    "no_silu": plain_no_silu,
    "no_norm_no_silu": identity,
    "broadcast": norm.GroupNorm.__call__,  # with bias.broadcast_channels replaced (BROADCAST)
}
BROADCAST = {"broadcast": lambda v, shape: jnp.broadcast_to(v, shape)}  # variant -> bias.broadcast_channels


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["unet-small", "unet-cifar"], default="unet-small")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--variants", default="plain,fused_jvp,custom_vjp,no_norm,no_silu,no_norm_no_silu")
    args = p.parse_args(argv)
    import throughput


    config, shape, batch = throughput.build_config(throughput.parse_args(["--model", args.model]))
    names = args.variants.split(",")
    runs, info, original, original_broadcast = {}, {}, norm.GroupNorm.__call__, bias.broadcast_channels
    for name in names:
        norm.GroupNorm.__call__ = VARIANTS[name]
        bias.broadcast_channels = BROADCAST.get(name, original_broadcast)
        try:
            step, state, batch_dict = throughput.build_train_step(config, shape, batch)
            start = time.perf_counter()
            compiled = step.lower(state, batch_dict).compile()
            info[name] = (time.perf_counter() - start, compiled.memory_analysis().temp_size_in_bytes / 2**20)
        finally:
            norm.GroupNorm.__call__ = original
            bias.broadcast_channels = original_broadcast
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
