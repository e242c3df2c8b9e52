"""Flow matching and rectified flow on the linear interpolant (`sde.Flow`):

    x_t = (1 - t) x_0 + t ε,   u = dx_t/dt = ε - x_0,   L = E_{t, x_0, ε} ||F(x_t, t) - (ε - x_0)||²

(conditional flow matching with the optimal-transport path at σ_min = 0, Lipman et al. 2022, arXiv
2210.02747, Eq. 23; rectified flow, Liu et al. 2022, arXiv 2209.03003, Eq. 1). t is uniform, or
logit-normal, t = sigmoid(m + s ξ) (Esser et al. 2024, arXiv 2403.03206, §3.1 'rf/lognorm(0.00, 1.00)'),
which puts more steps in the middle of the path.

Reflow (Liu et al. §2.2) retrains on couplings (ε, x_0 = ODE(ε)) drawn from a trained flow instead of
independent pairs: the new flow's paths are straighter, so few Euler steps go further. `straightness`
measures it as the paper's S(Z) = ∫ E ||(Z_1 - Z_0) - dZ_t/dt||² dt on a sampled trajectory.
"""

import jax
import jax.numpy as jnp

from diffusion_jax import diffusion
from diffusion_jax.diffusion import per_example
from diffusion_jax.errors import ConfigError

T_SAMPLINGS = ("uniform", "logit_normal")


def sample_times(key: jax.Array, batch_size: int, kind: str = "logit_normal", mean: float = 0.0,
                 std: float = 1.0) -> jax.Array:
    """t in (0, 1), float32 [B]: U(0, 1) ('uniform') or sigmoid(mean + std ξ) ('logit_normal')."""
    check_t_sampling(kind)
    if kind == "uniform":
        return jax.random.uniform(key, (batch_size,), jnp.float32)
    return jax.nn.sigmoid(mean + std * jax.random.normal(key, (batch_size,), jnp.float32))


def check_t_sampling(kind: str) -> None:
    if kind not in T_SAMPLINGS:
        raise ConfigError(f"flow.t_sampling: unknown {kind!r}; choose one of: {', '.join(T_SAMPLINGS)}")


def flow_matching_loss(
    velocity_fn: diffusion.ModelFn,
    x0: jax.Array,
    key: jax.Array,
    *,
    noise: jax.Array | None = None,
    t_sampling: str = "logit_normal",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The batch mean of mean_dims (F(x_t, t) - (ε - x_0))² for `velocity_fn(x_t [B, ...], t [B])`.

    ε is fresh N(0, I) noise, or `noise` [B, ...] paired with x0 (reflow's coupling). Returns the loss and
    {'t': [B], 'mse': [B]}.
    """
    t_key, noise_key = jax.random.split(key)
    t = sample_times(t_key, x0.shape[0], t_sampling, logit_mean, logit_std)
    eps = jax.random.normal(noise_key, x0.shape, jnp.float32) if noise is None else noise.astype(jnp.float32)
    x_t = per_example(1.0 - t, x0) * x0 + per_example(t, x0) * eps
    mse = jnp.mean(jnp.square(velocity_fn(x_t, t).astype(jnp.float32) - (eps - x0)), axis=tuple(range(1, x0.ndim)))
    return jnp.mean(mse), {"t": t, "mse": mse}


def straightness(trajectory: jax.Array, times: jax.Array) -> jax.Array:
    """S = Σ_k Δt_k ||c - (x_{t_k} - x_{t_{k+1}}) / Δt_k||² / Σ_k Δt_k, per example [B], for a trajectory
    [K + 1, B, ...] at decreasing times [K + 1] from (about) t = 1 (noise) to t = 0 (data), c the chord's
    velocity (x_{t_0} - x_{t_K}) / (t_0 - t_K): 0 for straight paths (Liu et al. 2022, Eq. 5, with the
    steps' velocities). Divided by the dimension, as an MSE."""
    dt = times[:-1] - times[1:]  # [K] > 0
    velocities = (trajectory[:-1] - trajectory[1:]) / per_example(dt, trajectory[1:])  # dx/dt [K, B, ...]
    chord = (trajectory[0] - trajectory[-1]) / (times[0] - times[-1])  # (x_1 - x_0) / 1 on the whole path
    axes = tuple(range(2, trajectory.ndim))
    deviation = jnp.mean(jnp.square(velocities - chord[None]), axis=axes)  # [K, B]
    return jnp.sum(dt[:, None] * deviation, axis=0) / jnp.sum(dt)
