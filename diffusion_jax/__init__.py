"""diffusion_jax: a JAX/Flax research codebase for diffusion models.

The pure core, for notebooks:

    import diffusion_jax as dj
    sched = dj.schedules.get("cosine", num_timesteps=1000)
    x_t = dj.diffusion.q_sample(sched, x0, t, noise)
    x0 = dj.samplers.get("ddim")(model_fn, sched, key, x_T, steps=50, prediction="eps")
"""

from diffusion_jax import diffusion, samplers, schedules

__all__ = ["diffusion", "samplers", "schedules"]
__version__ = "0.1.0"
