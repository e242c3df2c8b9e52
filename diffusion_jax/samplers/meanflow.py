"""MeanFlow sampling: jumps of the average velocity (Geng et al. 2025, arXiv 2505.13447, Eq. 12 and Algorithm 2)."""

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import diffusion, sde
from diffusion_jax.errors import ConfigError
from diffusion_jax.meanflow import model_time
from diffusion_jax.samplers.chain import SampleInfo, run_chain


def meanflow_sample(
    model_fn: diffusion.ModelFn,
    schedule: sde.Flow,
    key: jax.Array,
    x_T: jax.Array,
    steps: int = 1,
    prediction: str = "velocity",
    *,
    return_info: bool = False,
    return_trajectory: bool = False,
) -> jax.Array | tuple[jax.Array, SampleInfo]:
    """z_r = z_t - (t - r) u(z_t, r, t) over `steps` equal intervals from t = 1 (x_T, pure noise) to r = 0;
    one step (1 NFE) is the paper's one-step generation z_0 = ε - u(ε, 0, 1).

    `model_fn(z, (t, r) [B, 2])` is a 'meanflow' network (`models.Preconditioned`; `training.objective='meanflow'`),
    on `sde.Flow`. Deterministic: the key is unused."""
    if not isinstance(schedule, sde.Flow):
        raise ConfigError("sample.sampler: 'meanflow' jumps along the flow's path; it needs diffusion.process='flow' "
                          "and a training.objective='meanflow' run")
    if prediction != "velocity":
        raise ConfigError(f"diffusion.prediction: {prediction!r}; the 'meanflow' sampler takes the average velocity")
    times = jnp.asarray(np.linspace(0.0, 1.0, steps + 1), jnp.float32)  # t_0 = 0 (data) .. t_steps = 1 (noise)

    def step(z: jax.Array, state: None, i: jax.Array, key: jax.Array) -> tuple[jax.Array, None]:
        t, r = times[i + 1], times[i]
        full = lambda s: jnp.full(z.shape[:1], s, jnp.float32)  # noqa: E731
        u = model_fn(z, model_time(full(t), full(r)))
        return z - (t - r).astype(z.dtype) * u.astype(z.dtype), None

    return run_chain(step, x_T, key, steps, nfe=steps, return_info=return_info, return_trajectory=return_trajectory)
