"""Samplers: each a pure function that runs a whole reverse chain as one `lax.scan`.

Call shape (DESIGN §4), for every sampler in the registry:

    x0 = sampler(model_fn, schedule, key, x_T, steps=50, prediction="eps", **options)

`model_fn(x_t, t) -> prediction` is the network with its parameters and any
conditioning closed over; `t` is the int32 [B] index of the *training* schedule.
`x_T` may have any shape [B, ...]. `schedule` may also be a continuous process of
`diffusion_jax.sde` (then `t` is its float time; the 'meanflow' sampler calls a MeanFlow network at the pair
(t, r) [B, 2], `models.Preconditioned`). With `return_info=True` a sampler returns
`(x0, SampleInfo)` whose `nfe` is the number of network evaluations it used; with
`return_trajectory=True` its `trajectory` also holds every x_t, x_T first and x_0 last.
"""

import functools
from collections.abc import Callable

from diffusion_jax.registry import Registry
from diffusion_jax.samplers.chain import SampleInfo
from diffusion_jax.samplers.consistency import consistency_sample
from diffusion_jax.samplers.ddim import ddim_invert, ddim_sample, slerp
from diffusion_jax.samplers.ddpm import ddpm_sample
from diffusion_jax.samplers.dpm_solver import dpm_solver_pp_sample
from diffusion_jax.samplers.edm import edm_sample
from diffusion_jax.samplers.meanflow import meanflow_sample
from diffusion_jax.samplers.ode import ode_encode, ode_sample
from diffusion_jax.samplers.score_sde import annealed_langevin_sample, pc_sample
from diffusion_jax.vlb import VARIANCES

SAMPLERS: Registry[Callable] = Registry("sampler", "sample.sampler")
SAMPLERS.register("ddpm")(ddpm_sample)
SAMPLERS.register("ddim")(ddim_sample)
SAMPLERS.register("dpm_solver++")(dpm_solver_pp_sample)
SAMPLERS.register("euler")(functools.partial(edm_sample, solver="euler"))
SAMPLERS.register("heun")(functools.partial(edm_sample, solver="heun"))
SAMPLERS.register("pc")(pc_sample)
SAMPLERS.register("langevin")(annealed_langevin_sample)
SAMPLERS.register("ode")(ode_sample)
SAMPLERS.register("consistency")(consistency_sample)
SAMPLERS.register("meanflow")(meanflow_sample)


def get(name: str) -> Callable:
    """The sampler registered as `name`: 'ddpm' | 'ddim' | 'dpm_solver++' | 'euler' | 'heun' | 'pc' |
    'langevin' | 'ode' | 'consistency' | 'meanflow'."""
    return SAMPLERS.get(name)


def names() -> list[str]:
    return SAMPLERS.names()


__all__ = [
    "SAMPLERS",
    "VARIANCES",
    "SampleInfo",
    "annealed_langevin_sample",
    "consistency_sample",
    "ddim_invert",
    "ddim_sample",
    "ddpm_sample",
    "dpm_solver_pp_sample",
    "edm_sample",
    "meanflow_sample",
    "get",
    "names",
    "ode_encode",
    "ode_sample",
    "pc_sample",
    "slerp",
]
