"""The probability-flow ODE (Song et al. 2021, arXiv 2011.13456, §4.3 and Eq. 13) solved with an
adaptive Runge-Kutta method inside JAX (diffrax), for sampling (x_T -> x_0) and encoding (x_0 -> x_T).

Unlike score_sde's host-side `scipy.integrate.solve_ivp`, the whole solve is one compiled
program. The step size is shared by the batch (the error norm is an RMS over all of it), as
in score_sde.
"""

from collections.abc import Callable
from typing import Any

import diffrax
import jax
import jax.numpy as jnp

from diffusion_jax import diffusion, sde
from diffusion_jax.errors import ConfigError
from diffusion_jax.samplers.chain import SampleInfo, result
from diffusion_jax.samplers.levels import NoiseProcess

# Runge-Kutta solvers and the new network evaluations each step makes: all are FSAL (the last
# stage of a step is the first of the next), so a step of an s-stage method costs s - 1.
SOLVERS = {"tsit5": (diffrax.Tsit5, 6), "dopri5": (diffrax.Dopri5, 6), "dopri8": (diffrax.Dopri8, 13),
           "bosh3": (diffrax.Bosh3, 3)}


def probability_flow(
    model_fn: diffusion.ModelFn, process: sde.Process, prediction: str, clip_x0: float | None = None
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """dx/dt = f(x, t) - g(t)^2 s(x, t) / 2 with s = -eps^ / sigma_t; `drift(x [B, ...], t scalar)`."""
    diffusion.check_prediction(prediction, diffusion.MODEL_OUTPUTS)

    def drift(x: jax.Array, t: jax.Array) -> jax.Array:
        t_b = jnp.full((x.shape[0],), t, jnp.float32)
        alpha, sigma = process.alpha_sigma(t)
        eps = diffusion.to_x0_eps(model_fn(x, t_b), x, alpha, sigma, prediction, clip_x0).eps
        return process.probability_flow_drift(x, t_b, -eps / sigma)

    return drift


def solve(
    drift: Callable[[Any, jax.Array], Any],
    y0: Any,
    t0: float,
    t1: float,
    solver: str,
    rtol: float,
    atol: float,
    max_steps: int,
    save_steps: int | None = None,
    config_fields: tuple[str, str, str] = ("sample.ode_solver", "sample.rtol", "sample.atol"),
) -> tuple[Any, jax.Array, Any | None]:
    """Integrates dy/dt = drift(y, t) from t0 to t1 with `solver` and a PID step-size controller.

    `y0` is an array or any pytree of arrays (the likelihood integrates (x, log p) together);
    the error norm is diffrax's RMS over all of its leaves, so the step size is shared by the
    batch. Returns (y(t1), NFE, the trajectory at `save_steps` + 1 evenly spaced times or None).
    NFE counts evaluations of `drift` from diffrax's step statistics. Bad options raise `ConfigError`
    naming the config fields of (solver, rtol, atol) given in `config_fields`.
    """
    solver_field, rtol_field, atol_field = config_fields
    if solver not in SOLVERS:
        raise ConfigError(f"{solver_field}: unknown solver {solver!r}; choose one of: {', '.join(SOLVERS)}")
    if not (rtol > 0 and atol > 0):
        raise ConfigError(f"{rtol_field}, {atol_field}: tolerances must be > 0, got rtol={rtol}, atol={atol}")
    solver_cls, evals_per_step = SOLVERS[solver]
    saveat = diffrax.SaveAt(t1=True) if save_steps is None else diffrax.SaveAt(ts=jnp.linspace(t0, t1, save_steps + 1))
    solution = diffrax.diffeqsolve(
        diffrax.ODETerm(lambda t, y, args: drift(y, t)),
        solver_cls(),
        t0=t0,
        t1=t1,
        dt0=None,  # diffrax picks the first step from the tolerances (Hairer et al.'s heuristic)
        y0=y0,
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
        saveat=saveat,
        max_steps=max_steps,
    )
    # One evaluation at t0 (which the initial step-size guess shares), then s - 1 per attempted step.
    # Not counted: diffrax re-evaluates the first stage each time the *first* step is rejected
    # (a few evaluations on stiff starts; its stats do not say which steps were rejected).
    nfe = 1 + evals_per_step * solution.stats["num_steps"]
    trajectory = None if save_steps is None else solution.ys
    return jax.tree.map(lambda ys: ys[-1], solution.ys), nfe, trajectory


def ode_sample(
    model_fn: diffusion.ModelFn,
    schedule: NoiseProcess,
    key: jax.Array,
    x_T: jax.Array,
    steps: int | None = None,
    prediction: str = "eps",
    *,
    ode_solver: str = "tsit5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_steps: int = 4096,
    denoise_final: bool = True,
    clip_x0: float | None = None,
    return_info: bool = False,
    return_trajectory: bool = False,
) -> jax.Array | tuple[jax.Array, SampleInfo]:
    """Samples by integrating the probability-flow ODE from t_max to t_min with an adaptive solver.

    `schedule` is a continuous `sde.Process` or a discrete schedule, which is solved in its
    continuous view (`sde.DiscreteVP`, fractional model times). The number of steps follows
    from `rtol`/`atol` (score_sde uses 1e-5 for both with RK45); `steps` only sets how many
    evenly spaced states `return_trajectory` keeps (default 100). `denoise_final` returns the
    denoiser's x̂_0 at t_min (one more evaluation). Deterministic: `key` is unused. NFE is
    counted from diffrax's attempted steps (rejected steps cost too).
    """
    process = sde.as_process(schedule)
    drift = probability_flow(model_fn, process, prediction, clip_x0)
    save_steps = (steps or 100) if return_trajectory else None
    x, nfe, trajectory = solve(drift, x_T, process.t_max, process.t_min, ode_solver, rtol, atol, max_steps, save_steps)
    if denoise_final:
        t_min = jnp.full((x.shape[0],), process.t_min, jnp.float32)
        alpha, sigma = process.alpha_sigma(jnp.float32(process.t_min))
        x = diffusion.to_x0_eps(model_fn(x, t_min), x, alpha, sigma, prediction, clip_x0).x0
        nfe = nfe + 1
    return result(x, nfe, trajectory, return_info, return_trajectory)


def ode_encode(
    model_fn: diffusion.ModelFn,
    schedule: NoiseProcess,
    x0: jax.Array,
    prediction: str = "eps",
    *,
    ode_solver: str = "tsit5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_steps: int = 4096,
    return_info: bool = False,
) -> jax.Array | tuple[jax.Array, SampleInfo]:
    """Encodes data into the latent x_T by integrating the probability-flow ODE from t_min to t_max
    (Song et al. 2021, §4.3 'uniquely identifiable encoding'); `ode_sample(..., denoise_final=False)`
    from the result decodes it back to x_0 up to the solver tolerance."""
    process = sde.as_process(schedule)
    drift = probability_flow(model_fn, process, prediction)
    x_T, nfe, _ = solve(drift, x0, process.t_min, process.t_max, ode_solver, rtol, atol, max_steps)
    return result(x_T, nfe, None, return_info, False)
