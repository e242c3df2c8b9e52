"""Guidance as denoiser transforms: each turns a conditional network into a `model_fn(x_t, t)`
that any sampler drives unchanged (DESIGN §4 'Denoiser').
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

# (x_t [B, ...], t [B], cond [B] int labels) -> prediction [B, ...]
ConditionalModelFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def classifier_free(
    model_fn: ConditionalModelFn,
    cond: jax.Array,
    null_label: int,
    guidance_weight: float,
    interval: tuple[int, int] | None = None,
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """Classifier-free guidance (Ho & Salimans 2022, arXiv 2207.12598, Eq. 6):

        eps~(x, c) = (1 + w) eps(x, c) - w eps(x, null).

    `guidance_weight` is Ho & Salimans' w: w = 0 is the plain conditional model. The
    other common convention, a "scale" s (diffusers' `guidance_scale`, DiT's `cfg_scale`),
    is eps(x, null) + s (eps(x, c) - eps(x, null)), i.e. s = 1 + w. The combination
    weights sum to one, so it is the same guidance whichever of eps, x0 or v the
    network predicts. Both passes run as one batched forward of size 2B.
    `interval=(t_lo, t_hi)` guides only at training timesteps t_lo <= t <= t_hi
    (Kynkäänniemi et al. 2024, arXiv 2404.07724) and uses the conditional model elsewhere.
    """

    def guided(x_t: jax.Array, t: jax.Array) -> jax.Array:
        batch = x_t.shape[0]
        labels = jnp.concatenate([cond, jnp.full((batch,), null_label, cond.dtype)])
        out = model_fn(jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t]), labels)
        conditional, unconditional = out[:batch], out[batch:]
        w = jnp.asarray(guidance_weight, conditional.dtype)
        if interval is not None:
            inside = (t >= interval[0]) & (t <= interval[1])
            w = jnp.where(inside, w, 0.0).reshape((batch,) + (1,) * (x_t.ndim - 1))
        return conditional + w * (conditional - unconditional)

    return guided
