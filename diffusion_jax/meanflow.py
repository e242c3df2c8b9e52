"""MeanFlow: one-step generation by learning the average velocity of the flow (Geng et al. 2025,
arXiv 2505.13447).

On flow matching's path z_t = (1 - t) x_0 + t ε (`sde.Flow`), with instantaneous velocity v = ε - x_0, the
average velocity over [r, t] is u(z_t, r, t) = (1 / (t - r)) ∫_r^t v(z_τ, τ) dτ (Eq. 3), so one jump
z_r = z_t - (t - r) u(z_t, r, t) (Eq. 12) lands exactly where the ODE does. Differentiating (t - r) u = ∫_r^t v
in t gives the MeanFlow identity (Eq. 6)

    u(z_t, r, t) = v(z_t, t) - (t - r) d/dt u(z_t, r, t),   d/dt u = v ∂_z u + ∂_t u,

whose total derivative is one Jacobian-vector product of the network along (dz, dr, dt) = (v, 0, 1)
(`jax.jvp`, Eq. 8). The loss regresses u_θ on the right-hand side under stop-gradient (Eq. 9), with the
conditional velocity ε - x_0 for v (Eq. 10), each example's squared error reweighted adaptively by
w = 1 / (||Δ||² + c)^p under stop-gradient (§4.3; p = 1 is the paper's best on ImageNet, 0.75 its CIFAR-10
setting), ||Δ||² here the mean over dimensions, so c is in the units of a per-pixel squared error.

(t, r) pairs: two draws of `flow.sample_times` sorted so t >= r, and r = t (plain flow matching, the
instantaneous velocity) for all but a fraction `interval_ratio` of the batch (Table 1a: 25% is best at 1 NFE on
ImageNet; the paper's CIFAR-10 U-Net uses 75% with logit-normal(-2, 2) times, App. A).
The network is `models.Preconditioned`'s 'meanflow' kind, called at model time (t, r) [B, 2].
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from diffusion_jax import flow
from diffusion_jax.diffusion import per_example
from diffusion_jax.errors import ConfigError

AverageVelocityFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]  # u(z [B, ...], t [B], r [B]) -> [B, ...]


def model_time(t: jax.Array, r: jax.Array) -> jax.Array:
    """The pair (t, r) [B, 2] a 'meanflow' network is called at."""
    return jnp.stack([t, r], axis=-1)


def sample_time_pairs(
    key: jax.Array, batch_size: int, interval_ratio: float = 0.25, kind: str = "logit_normal", mean: float = -0.4,
    std: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """(t, r) float32 [B] each with 0 < r <= t < 1: two draws of `flow.sample_times`, the larger t; r = t except
    for a fraction `interval_ratio` of the examples (drawn independently per example)."""
    first_key, second_key, ratio_key = jax.random.split(key, 3)
    a = flow.sample_times(first_key, batch_size, kind, mean, std)
    b = flow.sample_times(second_key, batch_size, kind, mean, std)
    t, r = jnp.maximum(a, b), jnp.minimum(a, b)
    return t, jnp.where(jax.random.uniform(ratio_key, (batch_size,)) < interval_ratio, r, t)


def check_options(interval_ratio: float, adaptive_p: float, adaptive_c: float) -> None:
    """One-line ConfigErrors for `meanflow.*`."""
    if not 0.0 <= interval_ratio <= 1.0:
        raise ConfigError(f"meanflow.interval_ratio: {interval_ratio}; the fraction of examples with r < t, a float in "
                          "[0, 1] (the paper's 0.25; 0 is flow matching)")
    if adaptive_p < 0.0:
        raise ConfigError(f"meanflow.adaptive_p: {adaptive_p}; a float >= 0 (0: the plain squared error; paper 1.0)")
    if adaptive_c <= 0.0:
        raise ConfigError(f"meanflow.adaptive_c: {adaptive_c}; a float > 0 (the paper's 1e-3)")


def meanflow_target(
    average_velocity_fn: AverageVelocityFn, z: jax.Array, t: jax.Array, r: jax.Array, v: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(u(z, t, r), v - (t - r) (v ∂_z u + ∂_t u)), float32 [B, ...] each: the network's average velocity and the
    MeanFlow identity's right-hand side (Eq. 6) for the velocity `v` at (z, t), the total derivative d/dt u
    along the path as one `jax.jvp` with tangents (dz, dt, dr) = (v, 1, 0) (Eq. 8): one forward pass carries both.
    """
    u, dudt = jax.jvp(average_velocity_fn, (z, t, r), (v, jnp.ones_like(t), jnp.zeros_like(r)))
    u, dudt = u.astype(jnp.float32), dudt.astype(jnp.float32)
    return u, v.astype(jnp.float32) - per_example(t - r, u) * dudt


def meanflow_loss(
    average_velocity_fn: AverageVelocityFn,
    x0: jax.Array,
    key: jax.Array,
    *,
    interval_ratio: float = 0.25,
    t_sampling: str = "logit_normal",
    logit_mean: float = -0.4,
    logit_std: float = 1.0,
    adaptive_p: float = 1.0,
    adaptive_c: float = 1e-3,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """MeanFlow's loss (Eq. 9, Algorithm 1) for `average_velocity_fn(z [B, ...], t [B], r [B])`.

    Returns the batch mean of w · mean_dims (u_θ - sg(u_tgt))², w = sg(1 / (mse + c)^p), and
    {'t', 'r', 'mse'} ([B] each: the unweighted per-example squared error, the quantity the paper's Fig. 4 shows).
    """
    pair_key, noise_key = jax.random.split(key)
    t, r = sample_time_pairs(pair_key, x0.shape[0], interval_ratio, t_sampling, logit_mean, logit_std)
    eps = jax.random.normal(noise_key, x0.shape, jnp.float32)
    z = per_example(1.0 - t, x0) * x0 + per_example(t, x0) * eps
    u, target = meanflow_target(average_velocity_fn, z, t, r, eps - x0)  # v: the conditional velocity (Eq. 10)
    mse = jnp.mean(jnp.square(u - jax.lax.stop_gradient(target)), axis=tuple(range(1, x0.ndim)))  # [B]
    weight = jax.lax.stop_gradient(1.0 / (mse + adaptive_c) ** adaptive_p)
    return jnp.mean(weight * mse), {"t": t, "r": r, "mse": mse}
