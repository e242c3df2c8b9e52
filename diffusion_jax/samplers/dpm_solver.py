"""DPM-Solver++ multistep (Lu et al. 2022b, arXiv 2211.01095, Algorithm 2 and App. B)."""

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import diffusion
from diffusion_jax.errors import ConfigError
from diffusion_jax.samplers.chain import ChainEdit, SampleInfo, run_chain
from diffusion_jax.samplers.levels import NoiseProcess, denoiser, f32, noise_levels

ORDERS = (1, 2, 3)


def step_orders(
    num_steps: int,
    order: int,
    lower_order_final: bool,
    h: np.ndarray | None = None,
    max_step_ratio: float | None = None,
) -> np.ndarray:
    """Solver order of each step, indexed like the chain (step i runs when i steps remain).

    Multistep solvers warm up: the k-th step (k = 0, 1, ...) can use at most k + 1
    previous denoiser outputs. With `lower_order_final`, the last steps also drop to
    order i + 1, which Lu et al. (§3.4) found to stabilise sampling with few steps;
    the very last step, which jumps to sigma = 0, is always first order.

    With the steps' log-SNR increments `h` [num_steps] and `max_step_ratio`, a step whose
    h exceeds `max_step_ratio` times the previous step's drops to first order, and a
    third-order step whose previous step did so to second order: the multistep
    extrapolation (D_s - D_s') / (2 r), r = h_prev / h, amplifies the denoiser's change by
    1 / (2 r), which on a sharply multimodal target throws samples between the modes.
    """
    i = np.arange(num_steps)
    warmup = num_steps - i  # k + 1 for the k-th step taken
    final = i + 1 if lower_order_final else np.where(i == 0, 1, order)
    orders = np.minimum(np.minimum(order, warmup), final)
    if h is not None and max_step_ratio is not None:
        h_prev = np.append(h[1:], np.inf)  # step i follows step i + 1
        jump = h > max_step_ratio * h_prev
        orders = np.where(jump, 1, orders)
        orders = np.where(np.append(jump[1:], False), np.minimum(orders, 2), orders)
    return orders


def dpm_solver_pp_sample(
    model_fn: diffusion.ModelFn,
    schedule: NoiseProcess,
    key: jax.Array,
    x_T: jax.Array,
    steps: int = 20,
    prediction: str = "eps",
    *,
    order: int = 2,
    spacing: str = "logsnr",
    lower_order_final: bool = True,
    max_step_ratio: float | None = 2.0,
    clip_x0: float | None = None,
    return_info: bool = False,
    return_trajectory: bool = False,
    edit: ChainEdit | None = None,
) -> jax.Array | tuple[jax.Array, SampleInfo]:
    """Samples with DPM-Solver++(1/2/3M), the data-prediction multistep ODE solver.

    With D_i the denoiser's x̂_0 at step i, lambda = log(alpha / sigma) and
    h = lambda_t - lambda_s, the update from s to t is (Lu et al. 2022b, Eq. 9 and Alg. 2)

        x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D,

    with D = D_s (order 1, which is DDIM with eta = 0), D = D_s + (D_s - D_{s'}) / (2 r)
    (2M, r = h_prev / h), or the third-order combination of their Appendix B (3M). One
    network evaluation per step; the last step lands on sigma = 0 and returns x̂_0.
    `spacing` picks the `steps` timesteps ('logsnr', the paper's recommendation, or any
    of `schedules.SPACINGS`), on a discrete schedule or a continuous `sde.Process`. The chain
    is deterministic: `key` is unused. NFE = `steps`.
    """
    if order not in ORDERS:
        raise ConfigError(f"sample.order: DPM-Solver++ order must be one of {ORDERS}, got {order!r}")
    levels = noise_levels(schedule, steps, spacing)
    num_steps = levels.num
    denoise = denoiser(model_fn, levels, prediction, clip_x0)
    # Step i goes from level i to i - 1; step 0 goes to clean data (alpha = 1, sigma = 0).
    alpha, sigma, alpha_to, sigma_to = map(f32, (levels.alpha, levels.sigma, levels.alpha_to, levels.sigma_to))
    lam_np = np.log(levels.alpha) - np.log(levels.sigma)
    lam = f32(lam_np)
    lam_to = jnp.concatenate([lam[:1] + 1.0, lam[:-1]])  # step 0's h is infinite; its order is 1
    lam_from = jnp.concatenate([lam, jnp.full(2, lam[-1] - 1.0)])  # padded for the first steps
    h_np = np.append(np.inf, -np.diff(lam_np))  # step i's increment lambda_{i-1} - lambda_i
    orders = jnp.asarray(step_orders(num_steps, order, lower_order_final, h_np, max_step_ratio))

    def step(
        x: jax.Array, history: tuple[jax.Array, jax.Array], i: jax.Array, key: jax.Array
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        d1, d2 = history  # x̂_0 of the previous two steps
        d0 = denoise(x, i).x0
        a_t = alpha_to[i]
        # e^{-h} = (sigma_t / alpha_t) / (sigma_s / alpha_s), exactly 0 at the last step.
        em1 = sigma_to[i] / a_t * alpha[i] / sigma[i] - 1.0  # e^{-h} - 1
        base = sigma_to[i] / sigma[i] * x
        first = base - a_t * em1 * d0
        h = lam_to[i] - lam[i]
        r0 = (lam[i] - lam_from[i + 1]) / h
        r1 = (lam_from[i + 1] - lam_from[i + 2]) / h
        second = base - a_t * em1 * (d0 + (d0 - d1) / (2.0 * r0))
        d1_0, d1_1 = (d0 - d1) / r0, (d1 - d2) / r1
        slope = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
        curvature = (d1_0 - d1_1) / (r0 + r1)
        third = first + a_t * (em1 / h + 1.0) * slope - a_t * ((em1 + h) / h**2 - 0.5) * curvature
        x_prev = jnp.where(orders[i] == 1, first, jnp.where(orders[i] == 2, second, third))
        return x_prev, (d0, d1)

    history = (jnp.zeros_like(x_T), jnp.zeros_like(x_T))
    return run_chain(
        step,
        x_T,
        key,
        num_steps,
        nfe=num_steps,
        return_info=return_info,
        return_trajectory=return_trajectory,
        state=history,
        levels=levels,
        edit=edit,
    )
