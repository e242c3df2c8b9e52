"""Consistency models (Song et al. 2023, arXiv 2303.01469) and their improved training (Song &
Dhariwal 2023, arXiv 2310.14189): a network f(x_σ, σ) that maps any point of a probability-flow
ODE trajectory to the trajectory's origin, so one evaluation samples.

Everything is in EDM's variance-exploding scale (`sde.EDM`: x_σ = x + σ z, model time t = σ), on
the Karras grid σ_1 < ... < σ_N between σ_min and σ_max (EDM Eq. 5, ρ = 7). The consistency
function is parameterised so that the boundary condition f(x, σ_min) = x holds exactly (§3, App. C):

    f(x, σ) = c_skip(σ) x + c_out(σ) F(c_in(σ) x, c_noise(σ)),
    c_skip = σ_d² / ((σ - σ_min)² + σ_d²),  c_out = σ_d (σ - σ_min) / sqrt(σ_d² + σ²),
    c_in = 1 / sqrt(σ² + σ_d²),             c_noise = 250 ln σ  (the official code's 1000 · ¼ ln σ).

Training pulls f at adjacent grid levels together: f_θ(x_{σ_{n+1}}, σ_{n+1}) toward the target network's
f_θ⁻(x̂_{σ_n}, σ_n), where x̂_{σ_n} is one Heun step of a teacher's probability-flow ODE (consistency
distillation, CD, Algorithm 2) or x + σ_n z with the same z (consistency training, CT, Algorithm 3).
CD's target θ⁻ is an EMA of θ; iCT's is θ itself under stop_gradient, with the pseudo-Huber distance,
the weight 1/(σ_{n+1} - σ_n), levels drawn from a discretised lognormal, and N doubling on a schedule.
"""

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import erf

from diffusion_jax import diffusion, sde
from diffusion_jax.diffusion import per_example
from diffusion_jax.errors import ConfigError

DISTANCES = ("l2", "pseudo_huber")


class Grid(NamedTuple):
    """The σ range and the parameterisation constants (the papers' CIFAR-10 values by default)."""

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5
    rho: float = 7.0


CIFAR10 = Grid()  # CD's and iCT's CIFAR-10 settings (σ in [0.002, 80], σ_data 0.5, ρ 7)


def karras_sigmas(num_levels: jax.Array | int, grid: Grid = CIFAR10) -> jax.Array:
    """σ_1 < ... < σ_N on EDM's ρ-ramp (float32 [N_max] for a static N; see `sigma_at` for a traced N)."""
    n = int(num_levels)
    return sigma_at(jnp.arange(n), jnp.int32(n), grid)


def sigma_at(index: jax.Array, num_levels: jax.Array, grid: Grid = CIFAR10) -> jax.Array:
    """σ of 0-based level `index` (int [...]) of an N-level grid, N traceable (iCT's N changes in training):
    (σ_min^(1/ρ) + index / (N - 1) (σ_max^(1/ρ) - σ_min^(1/ρ)))^ρ."""
    lo, hi = grid.sigma_min ** (1 / grid.rho), grid.sigma_max ** (1 / grid.rho)
    u = index.astype(jnp.float32) / (num_levels - 1).astype(jnp.float32)
    return (lo + u * (hi - lo)) ** grid.rho


def scalings(sigma: jax.Array, grid: Grid = CIFAR10) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(c_skip, c_out, c_in, c_noise) at σ [B] (module docstring); c_skip(σ_min) = 1, c_out(σ_min) = 0."""
    sd2 = grid.sigma_data**2
    c_skip = sd2 / ((sigma - grid.sigma_min) ** 2 + sd2)
    c_out = grid.sigma_data * (sigma - grid.sigma_min) / jnp.sqrt(sd2 + sigma**2)
    c_in = 1.0 / jnp.sqrt(sigma**2 + sd2)
    return c_skip, c_out, c_in, 250.0 * jnp.log(sigma)


def consistency_function(network_fn: diffusion.ModelFn, grid: Grid = CIFAR10) -> diffusion.ModelFn:
    """f(x, σ) = c_skip x + c_out F(c_in x, c_noise) from the raw network F(x, t) [B, ...] -> [B, ...]:
    a denoiser on `sde.EDM` with prediction 'x0' (so every sampler can drive it)."""

    def f(x: jax.Array, sigma: jax.Array) -> jax.Array:
        c_skip, c_out, c_in, c_noise = scalings(sigma, grid)
        out = network_fn(per_example(c_in, x) * x, c_noise).astype(jnp.float32)
        return per_example(c_skip, x) * x + per_example(c_out, x) * out

    return f


def heun_step(denoise: diffusion.ModelFn, x: jax.Array, sigma: jax.Array, sigma_next: jax.Array) -> jax.Array:
    """One Heun step of the probability-flow ODE dx/dσ = (x - D(x, σ)) / σ from σ to σ_next (EDM Alg. 1,
    the CD paper's teacher solver); `denoise(x, σ)` is the teacher's x̂_0 in the VE scale."""
    s, s_next = per_example(sigma, x), per_example(sigma_next, x)
    d = (x - denoise(x, sigma)) / s
    x_euler = x + (s_next - s) * d
    d_next = (x_euler - denoise(x_euler, sigma_next)) / s_next
    return x + (s_next - s) * 0.5 * (d + d_next)


def distance(a: jax.Array, b: jax.Array, kind: str) -> jax.Array:
    """Per-example d(a, b) [B]: squared L2 ('l2', CD's) or pseudo-Huber sqrt(|a - b|² + c²) - c with
    c = 0.00054 sqrt(dim) ('pseudo_huber', iCT §3.3)."""
    diff = (a - b).reshape(a.shape[0], -1).astype(jnp.float32)
    squared = jnp.sum(jnp.square(diff), axis=1)
    if kind == "l2":
        return squared
    c = 0.00054 * math.sqrt(diff.shape[1])
    return jnp.sqrt(squared + c**2) - c


def check_distance(kind: str) -> None:
    if kind not in DISTANCES:
        raise ConfigError(f"consistency.distance: unknown distance {kind!r}; choose one of: {', '.join(DISTANCES)}")


CHOICES = {"curriculum": ("fixed", "ict"), "level_sampling": ("uniform", "lognormal"),
           "weighting": ("uniform", "inverse_gap"), "distance": DISTANCES}


def check_options(options: Any) -> None:
    """One-line ConfigErrors for the `consistency` config section's choices and grid sizes."""
    for name, allowed in CHOICES.items():
        if options[name] not in allowed:
            raise ConfigError(f"consistency.{name}: unknown {options[name]!r}; choose one of: {', '.join(allowed)}")
    if options.curriculum == "fixed" and not (isinstance(options.num_levels, int) and options.num_levels >= 2):
        raise ConfigError(f"consistency.num_levels: {options.num_levels!r}; need an int >= 2 (the grid's N)")
    if options.curriculum == "ict" and not 2 <= options.s0 <= options.s1:
        raise ConfigError(f"consistency.s0, consistency.s1: {options.s0}, {options.s1}; need 2 <= s0 <= s1")


def ve_denoiser(model_fn: diffusion.ModelFn, process: Any, prediction: str) -> diffusion.ModelFn:
    """A diffusion model's x̂_0 as a function of the VE-scale point (x, σ) the consistency grid uses.

    x_VE = x_t / α_t and σ = σ_t / α_t, so the model is called at the time t whose log-SNR is -2 ln σ with
    x_t = α_t x (σ beyond the process's range clips to its ends); on `sde.EDM` that is t = σ and x_t = x,
    and a discrete schedule is read through `sde.DiscreteVP`'s continuous view.
    """
    continuous = sde.as_process(process)

    def denoise(x: jax.Array, sigma: jax.Array) -> jax.Array:
        t = continuous.time_at_log_snr(-2.0 * jnp.log(sigma))
        alpha, sigma_t = (per_example(a, x) for a in continuous.alpha_sigma(t))
        x_t = alpha * x
        return diffusion.to_x0_eps(model_fn(x_t, t), x_t, alpha, sigma_t, prediction).x0

    return denoise


def ict_num_levels(step: jax.Array, total_steps: int, s0: int = 10, s1: int = 1280) -> jax.Array:
    """iCT's discretisation curriculum N(k) = min(s0 2^⌊k / K'⌋, s1) + 1 with
    K' = ⌊K / (log2⌊s1 / s0⌋ + 1)⌋ (Song & Dhariwal 2023, §3.4)."""
    stages = int(np.log2(s1 // s0)) + 1
    k_prime = max(total_steps // stages, 1)
    doublings = (step // k_prime).astype(jnp.int32)
    return jnp.minimum(s0 * jnp.left_shift(1, jnp.minimum(doublings, 30)), s1) + 1


def lognormal_level_probs(num_levels: jax.Array, max_levels: int, grid: Grid = CIFAR10, p_mean: float = -1.1,
                          p_std: float = 2.0) -> jax.Array:
    """iCT's p(n) ∝ erf((ln σ_{n+1} - P_mean) / (√2 P_std)) - erf((ln σ_n - P_mean) / (√2 P_std)) over
    n = 0..N-2 (float32 [max_levels - 1], zero beyond N - 2), §3.5."""
    n = jnp.arange(max_levels - 1)
    cdf = lambda s: erf((jnp.log(s) - p_mean) / (math.sqrt(2.0) * p_std))  # noqa: E731
    weights = cdf(sigma_at(n + 1, num_levels, grid)) - cdf(sigma_at(n, num_levels, grid))
    weights = jnp.where(n < num_levels - 1, weights, 0.0)
    return weights / jnp.sum(weights)


def consistency_loss(
    student_fn: diffusion.ModelFn,
    target_fn: diffusion.ModelFn,
    x0: jax.Array,
    key: jax.Array,
    num_levels: jax.Array | int,
    *,
    teacher_denoise: diffusion.ModelFn | None = None,
    grid: Grid = CIFAR10,
    distance_kind: str = "l2",
    level_sampling: str = "uniform",
    max_levels: int | None = None,
    weighting: str = "uniform",
    p_mean: float = -1.1,
    p_std: float = 2.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """One minibatch of CD (with `teacher_denoise`, Algorithm 2) or CT (without, Algorithm 3).

    n is drawn per example (`level_sampling` 'uniform' on 0..N-2, or iCT's 'lognormal'); x_{σ_{n+1}} =
    x0 + σ_{n+1} z; the target point is the teacher's Heun step to σ_n (CD) or x0 + σ_n z with the same z
    (CT); loss = mean_B λ(σ_n) d(f_θ(x_{σ_{n+1}}, σ_{n+1}), f_θ⁻(x̂_{σ_n}, σ_n)), λ = 1 ('uniform') or
    1 / (σ_{n+1} - σ_n) ('inverse_gap', iCT). `student_fn` and `target_fn` are consistency functions
    (`consistency_function`); the target is under stop_gradient. `num_levels` N may be traced (then
    `max_levels` bounds it); `p_mean`, `p_std` are the lognormal's. Returns
    (loss, {'sigma': σ_{n+1} [B], 'distance': d [B]}).
    """
    check_distance(distance_kind)
    n_key, z_key = jax.random.split(key)
    batch = x0.shape[0]
    num_levels = jnp.asarray(num_levels, jnp.int32)
    if level_sampling == "lognormal":
        probs = lognormal_level_probs(num_levels, max_levels or int(num_levels), grid, p_mean, p_std)
        n = jax.random.choice(n_key, probs.shape[0], (batch,), p=probs)
    else:
        n = jax.random.randint(n_key, (batch,), 0, num_levels - 1)
    sigma, sigma_next = sigma_at(n, num_levels, grid), sigma_at(n + 1, num_levels, grid)
    z = jax.random.normal(z_key, x0.shape, jnp.float32)
    x_next = x0 + per_example(sigma_next, x0) * z
    if teacher_denoise is None:
        x_here = x0 + per_example(sigma, x0) * z
    else:
        x_here = heun_step(teacher_denoise, x_next, sigma_next, sigma)
    target = jax.lax.stop_gradient(target_fn(jax.lax.stop_gradient(x_here), sigma))
    d = distance(student_fn(x_next, sigma_next), target, distance_kind)
    weight = 1.0 / (sigma_next - sigma) if weighting == "inverse_gap" else jnp.ones_like(sigma)
    return jnp.mean(weight * d), {"sigma": sigma_next, "distance": d}
