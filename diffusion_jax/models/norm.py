"""GroupNorm fused with ADM's scale-shift and SiLU, one op with a hand-written derivative (custom JVP).

GroupNorm (Wu & He 2018, arXiv 1803.08494, eq. (1)-(2)) over NHWC x [B, H, W, C] with G groups:

    x̂ = (x - μ_bg) r_bg,  r = 1 / sqrt(σ²_bg + eps),  μ, σ² over the H*W*C/G entries of group g of example b,
    a = γ_c x̂ + β_c,
    a' = a (1 + s_bc) + t_bc               (ADM's AdaGN, Dhariwal & Nichol 2021, §3; s = t = 0 without),
    y = SiLU(a') = a' σ(a')                (or y = a' without the activation).

The statistic is single-pass, σ² = max(E[x²] - μ², 0), as flax's `nnx.GroupNorm` (its default
`use_fast_variance=True`), so the output equals `nnx.GroupNorm` + scale-shift + `nnx.silu` to
float32 rounding. Everything per element is then one multiply-add a' = A_bc x + B_bc with
per-(example, channel) coefficients.

Why a hand-written derivative: differentiated by JAX, those four lines became ~12 XLA:CPU ops per
norm in the train step (the mean and variance and their gradients as separate split reductions, the
SiLU derivative's division, the scale-shift's broadcasts), which ran one at a time on one core and
cost the small U-Net's train step 35% (GroupNorm) and 22% (SiLU) of its time (benchmarks/README.md,
"Fewer, fatter ops"). The JVP is the normalisation derivative (Ioffe & Szegedy 2015, §3) with
k = (1 + s) γ r:

    da' = k dx - k mean_g(dx) - x̂ (k mean_g(x̂ dx) - (1 + s) dγ - γ ds) + (1 + s) dβ + β ds + dt,

written with every [B, C] coefficient multiplying a broadcast, so that its transpose, the VJP that
reverse mode derives from it, reduces the full-size arrays only twice, P_bc = Σ_hw g' and
Q_bc = Σ_hw g' x̂ with g' = dy SiLU'(a'), and gets every other cotangent from them on [B, C]
arrays (dt = P, ds = γQ + βP, dβ = Σ_b (1+s)P, dγ = Σ_b (1+s)Q; dx one elementwise pass). A JVP,
not a custom VJP, keeps forward mode working: the ODE likelihood's divergence, the conditional
inpainting denoiser and JVP-based objectives differentiate networks forwards.
"""

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import DTypeLike


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
def _group_norm_act(x, gamma, beta, film_scale, film_shift, groups, eps, silu, out_dtype):
    a, _, _ = _forward(x, gamma, beta, film_scale, film_shift, groups, eps)
    return (a * jax.nn.sigmoid(a) if silu else a).astype(out_dtype)


@_group_norm_act.defjvp
def _group_norm_act_jvp(groups, eps, silu, out_dtype, primals, tangents):
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


def group_norm_act(
    x: jax.Array,
    gamma: jax.Array,
    beta: jax.Array,
    *,
    groups: int,
    eps: float,
    scale: jax.Array | None = None,
    shift: jax.Array | None = None,
    silu: bool = False,
    dtype: DTypeLike | None = None,
) -> jax.Array:
    """SiLU?(GroupNorm(x) (1 + scale) + shift), NHWC (module docstring), with the fused backward.

    x: [B, H, W, C]; gamma, beta: [C]; scale, shift: [B, C] (ADM's AdaGN; None: 0); statistics and
    arithmetic in float32; returns `dtype` (None: x's dtype).
    """
    b, *_, c = x.shape
    zeros = jnp.zeros((b, c), jnp.float32)
    film_scale = zeros if scale is None else scale.astype(jnp.float32)
    film_shift = zeros if shift is None else shift.astype(jnp.float32)
    out_dtype = jnp.dtype(dtype if dtype is not None else x.dtype)
    return _group_norm_act(
        x, gamma.astype(jnp.float32), beta.astype(jnp.float32), film_scale, film_shift, groups, eps, silu, out_dtype
    )


class GroupNorm(nnx.Module):
    """GroupNorm with parameters `scale` [C] (ones) and `bias` [C] (zeros), named as `nnx.GroupNorm`'s
    so checkpoints and weight-conversion tables see the same paths; `__call__` optionally applies
    ADM's scale-shift and SiLU in the same fused op (`group_norm_act`). NHWC inputs."""

    def __init__(
        self,
        num_features: int,
        *,
        num_groups: int,
        epsilon: float = 1e-6,
        dtype: DTypeLike | None = None,
        rngs: nnx.Rngs,
    ):
        del rngs  # deterministic initialisation; the argument keeps nnx.GroupNorm's signature
        if num_features % num_groups:
            raise ValueError(f"num_groups: {num_groups} does not divide the {num_features} channels")
        self.num_groups = num_groups
        self.epsilon = epsilon
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))

    def __call__(
        self,
        x: jax.Array,
        *,
        scale: jax.Array | None = None,
        shift: jax.Array | None = None,
        silu: bool = False,
    ) -> jax.Array:
        """x [B, H, W, C] (or [B, T, C], treated as H*W = T) -> the same shape; scale, shift [B, C]."""
        shape = x.shape
        x4 = x if x.ndim == 4 else x.reshape(shape[0], -1, 1, shape[-1])
        y = group_norm_act(
            x4, self.scale[...], self.bias[...], groups=self.num_groups, eps=self.epsilon,
            scale=scale, shift=shift, silu=silu, dtype=self.dtype,
        )
        return y.reshape(shape)
