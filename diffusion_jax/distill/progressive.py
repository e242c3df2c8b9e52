"""Progressive distillation (Salimans & Ho 2022, arXiv 2202.00512): a student that takes half the
DDIM steps of its teacher, repeated round after round.

Round r trains a student, initialised from the teacher, so that one deterministic DDIM step of the
student from level t to t'' = t - 1/N lands where two DDIM steps of the teacher (t -> t' = t - 0.5/N
-> t'') land (Algorithm 2). For z_t = α_t x + σ_t ε and the teacher's two steps

    z_t'  = α_t' x̂_η(z_t)   + (σ_t' / σ_t)   (z_t  - α_t  x̂_η(z_t)),
    z_t'' = α_t'' x̂_η(z_t') + (σ_t'' / σ_t') (z_t' - α_t' x̂_η(z_t')),

the student's x-prediction that makes its own single step land on z_t'' is

    x̃ = (z_t'' - (σ_t'' / σ_t) z_t) / (α_t'' - (σ_t'' / σ_t) α_t),

and the loss is w(λ_t) ||x̂_θ(z_t) - x̃||² with the truncated-SNR weight max(SNR, 1) (§4; or
SNR + 1). The student then becomes the next round's teacher and N halves.

Discrete schedules: the N levels of a student are the DDIM 'trailing' timesteps (Lin et al. 2024),
level i ↔ timestep round(i T / N) - 1 for i = 1..N and level 0 ↔ clean data (α = 1, σ = 0), so
level i of N steps is level 2i of 2N steps exactly, the teacher's half steps are training
timesteps (for 2N ≤ T), and the distilled student samples with the project's own
`ddim` sampler at `spacing='trailing'`, `steps=N`.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from diffusion_jax import diffusion
from diffusion_jax.diffusion import per_example
from diffusion_jax.errors import ConfigError
from diffusion_jax.schedules import Schedule

WEIGHTINGS = ("truncated_snr", "snr_plus_one")


class Level(NamedTuple):
    """A level of an N-step grid: the model time and (α, σ), each [B] (clean data: t = 0, α = 1, σ = 0)."""

    t: jax.Array  # int32 [B]; the network is never called at a clean level
    alpha: jax.Array  # float32 [B]
    sigma: jax.Array  # float32 [B]


def level(schedule: Schedule, i: jax.Array, num_steps: jax.Array) -> Level:
    """Level i of the N-step trailing grid: timestep round(i T / N) - 1 for i ≥ 1, clean data for i = 0.

    `i` int [B], `num_steps` N int (may be traced). T / N and i T / N are exact in float32 for N a
    power of two, and round half to even as numpy's, so the timesteps are `space_timesteps(T, N,
    'trailing')`'s.
    """
    T = schedule.num_timesteps
    ratio = jnp.float32(T) / num_steps.astype(jnp.float32)
    t = jnp.clip(jnp.round(i.astype(jnp.float32) * ratio).astype(jnp.int32) - 1, 0, T - 1)
    clean = i == 0
    alpha = jnp.where(clean, 1.0, schedule.alpha[t])
    sigma = jnp.where(clean, 0.0, schedule.sigma[t])
    return Level(t, alpha.astype(jnp.float32), sigma.astype(jnp.float32))


def ddim_step(z: jax.Array, x0: jax.Array, at: Level, to: Level) -> jax.Array:
    """Deterministic DDIM from level `at` to level `to` given x̂_0: α_to x̂ + (σ_to / σ_at)(z - α_at x̂)."""
    a, s = per_example(at.alpha, z), per_example(at.sigma, z)
    a_to, s_to = per_example(to.alpha, z), per_example(to.sigma, z)
    return a_to * x0 + (s_to / s) * (z - a * x0)


def x0_of(model_fn: diffusion.ModelFn, z: jax.Array, at: Level, prediction: str) -> jax.Array:
    """x̂_0 of a network of kind `prediction` at level `at`."""
    out = model_fn(z, at.t).astype(jnp.float32)
    return diffusion.to_x0_eps(out, z, per_example(at.alpha, z), per_example(at.sigma, z), prediction).x0


def distillation_target(
    teacher_fn: diffusion.ModelFn, schedule: Schedule, z_t: jax.Array, i: jax.Array, num_steps: jax.Array,
    prediction: str,
) -> jax.Array:
    """x̃ [B, ...]: the x-prediction at student level i (of N) whose one DDIM step lands where the teacher's
    two DDIM steps (over levels 2i -> 2i - 1 -> 2i - 2 of 2N) land (Salimans & Ho, Algorithm 2)."""
    teacher_steps = 2 * num_steps
    start, middle, end = (level(schedule, 2 * i - k, teacher_steps) for k in (0, 1, 2))
    z_mid = ddim_step(z_t, x0_of(teacher_fn, z_t, start, prediction), start, middle)
    z_end = ddim_step(z_mid, x0_of(teacher_fn, z_mid, middle, prediction), middle, end)
    ratio = per_example(end.sigma / start.sigma, z_t)
    return (z_end - ratio * z_t) / (per_example(end.alpha, z_t) - ratio * per_example(start.alpha, z_t))


def distillation_loss(
    student_fn: diffusion.ModelFn,
    teacher_fn: diffusion.ModelFn,
    schedule: Schedule,
    x0: jax.Array,
    key: jax.Array,
    num_steps: jax.Array,
    *,
    prediction: str = "v",
    teacher_prediction: str | None = None,
    weighting: str = "truncated_snr",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """One minibatch of Algorithm 2 for an N-step student: i ~ U{1..N}, z_t = α_t x + σ_t ε at level i,
    loss = mean_B w(λ_t) mean_dims (x̂_θ(z_t) - x̃)². The teacher is a constant (stop_gradient).

    x0 [B, ...]; `num_steps` N (int, may be traced); `prediction` is the student's parameterisation,
    `teacher_prediction` the teacher's (None: the same; a student initialised from its teacher
    shares it). Returns (loss, {'t': timesteps [B], 'mse': x-space errors [B]}).
    """
    check_weighting(weighting)
    i_key, noise_key = jax.random.split(key)
    i = jax.random.randint(i_key, (x0.shape[0],), 1, num_steps + 1)
    at = level(schedule, i, num_steps)
    noise = jax.random.normal(noise_key, x0.shape, jnp.float32)
    z_t = per_example(at.alpha, x0) * x0 + per_example(at.sigma, x0) * noise
    target = jax.lax.stop_gradient(
        distillation_target(teacher_fn, schedule, z_t, i, num_steps, teacher_prediction or prediction)
    )
    x0_hat = x0_of(student_fn, z_t, at, prediction)
    mse = jnp.mean(jnp.square(x0_hat - target), axis=tuple(range(1, x0.ndim)))
    log_snr = 2.0 * (jnp.log(at.alpha) - jnp.log(at.sigma))
    return jnp.mean(diffusion.loss_weight(log_snr, "x0", weighting) * mse), {"t": at.t, "mse": mse}


def check_weighting(weighting: str) -> None:
    if weighting not in WEIGHTINGS:
        raise ConfigError(f"distill.weighting: unknown weighting {weighting!r}; choose one of: {', '.join(WEIGHTINGS)}")


def student_steps(step: jax.Array, teacher_steps: int, steps_per_round: int) -> jax.Array:
    """N of the round that train step `step` (0-based) belongs to: teacher_steps / 2^(round + 1)."""
    round_index = step // steps_per_round
    return jnp.right_shift(jnp.int32(teacher_steps), (round_index + 1).astype(jnp.int32))


def check_rounds(teacher_steps: int, rounds: int, steps_per_round: int, num_timesteps: int, num_steps: int) -> None:
    """One-line ConfigErrors for a round plan that cannot run on this schedule."""
    if rounds < 1 or steps_per_round < 1:
        raise ConfigError(f"distill.rounds, distill.steps_per_round: must be ≥ 1, got {rounds}, {steps_per_round}")
    if teacher_steps < 2 or teacher_steps & (teacher_steps - 1):
        raise ConfigError(f"distill.teacher_steps: the first teacher's DDIM steps must be a power of two ≥ 2 "
                          f"(each round halves them), got {teacher_steps}")
    if teacher_steps > num_timesteps:
        raise ConfigError(f"distill.teacher_steps: {teacher_steps} DDIM steps need distinct training timesteps; the "
                          f"schedule has diffusion.num_timesteps={num_timesteps}")
    if teacher_steps >> rounds < 1:
        raise ConfigError(f"distill.rounds: {rounds} halvings of distill.teacher_steps={teacher_steps} leave less than "
                          f"one step; at most {teacher_steps.bit_length() - 1}")
    if num_steps > rounds * steps_per_round:
        raise ConfigError(f"training.num_steps: {num_steps}; progressive distillation trains at most distill.rounds × "
                          f"distill.steps_per_round = {rounds * steps_per_round} steps")
