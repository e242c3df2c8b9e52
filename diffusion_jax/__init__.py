"""diffusion_jax: a JAX/Flax research codebase for diffusion models.

The pure core, for notebooks:

    import diffusion_jax as dj
    sched = dj.schedules.get("cosine", num_timesteps=1000)
    x_t = dj.diffusion.q_sample(sched, x0, t, noise)
    x0 = dj.samplers.get("ddim")(model_fn, sched, key, x_T, steps=50, prediction="eps")
    x0 = dj.samplers.get("ddpm")(model_fn, sched, key, x_T, edit=dj.editing.Edit(known=y, mask=m))  # inpainting
    unet = dj.models.create("unet", rngs=flax.nnx.Rngs(0), image_size=32, in_channels=3)
    model = dj.load("runs/ddpm_digits")   # a trained workdir's network, schedule and config; no train state
    images = model.sample(key, 16, sampler="dpm_solver++", steps=20)
    mixture = dj.exact.ring(8)            # Gaussian mixtures with closed-form denoisers, to check samplers

The configs (`dj.config`), the data pipeline (`dj.data`), the training system (`dj.training`) and the
sample-quality metrics (`dj.metrics`) are imported on first use: they bring in tfds, grain and orbax.
"""

import importlib

from diffusion_jax import (
    conditioning,
    diffusion,
    editing,
    exact,
    guidance,
    inpaint,
    inverse,
    likelihood,
    models,
    runtime,
    samplers,
    schedules,
    sde,
    vlb,
)

_LAZY_MODULES = ("config", "data", "loading", "metrics", "training")

__all__ = [
    "LoadedModel", "conditioning", "config", "data", "diffusion", "editing", "exact", "guidance", "inpaint",
    "inverse", "likelihood", "load", "loading", "metrics", "models", "runtime", "samplers", "schedules", "sde",
    "training", "vlb",
]


def __getattr__(name: str) -> object:
    """`load`, `LoadedModel` and the modules of `_LAZY_MODULES` on first use: they import orbax, tfds and grain."""
    if name in ("load", "LoadedModel"):
        return getattr(importlib.import_module("diffusion_jax.loading"), name)
    if name in _LAZY_MODULES:
        return importlib.import_module(f"diffusion_jax.{name}")
    raise AttributeError(f"module 'diffusion_jax' has no attribute {name!r}")
__version__ = "0.1.0"
