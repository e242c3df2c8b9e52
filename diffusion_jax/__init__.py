"""diffusion_jax: a JAX/Flax research codebase for diffusion models.

The pure core, for notebooks:

    import diffusion_jax as dj
    sched = dj.schedules.get("cosine", num_timesteps=1000)
    x_t = dj.diffusion.q_sample(sched, x0, t, noise)
    x0 = dj.samplers.get("ddim")(model_fn, sched, key, x_T, steps=50, prediction="eps")
    x0 = dj.samplers.get("ddpm")(model_fn, sched, key, x_T, edit=dj.editing.Edit(known=y, mask=m))  # inpainting
    unet = dj.models.create("unet", rngs=flax.nnx.Rngs(0), image_size=32, in_channels=3)
    model = dj.load("runs/ddpm_digits")   # a trained workdir's network, schedule and config; no train state

The data pipeline (`diffusion_jax.data`), the training system (`diffusion_jax.training`) and the
sample-quality metrics (`diffusion_jax.metrics`) are imported on their own.
"""

from diffusion_jax import (
    conditioning,
    diffusion,
    editing,
    guidance,
    inpaint,
    likelihood,
    models,
    samplers,
    schedules,
    sde,
    vlb,
)

__all__ = [
    "LoadedModel", "conditioning", "diffusion", "editing", "guidance", "inpaint", "likelihood", "load", "models",
    "samplers", "schedules", "sde", "vlb",
]


def __getattr__(name: str) -> object:
    """`load` and `LoadedModel` (diffusion_jax.loading) on first use: they import orbax and the training setup."""
    if name in ("load", "LoadedModel"):
        from diffusion_jax import loading

        return getattr(loading, name)
    raise AttributeError(f"module 'diffusion_jax' has no attribute {name!r}")
__version__ = "0.1.0"
