"""The reverse-chain driver shared by the ancestral samplers."""

from collections.abc import Callable

import jax
import jax.numpy as jnp

# step(x_t [B,...], i: int32 scalar step index, key) -> x_{prev} [B,...]
StepFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def run_chain(
    step: StepFn, x_T: jax.Array, key: jax.Array, num_steps: int, return_trajectory: bool
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Applies `step` for i = num_steps-1, ..., 0 in one `lax.scan`.

    Step i draws its noise from `fold_in(key, i)`, so a chain is a pure function
    of (key, x_T). Returns x_0, or (x_0, trajectory [num_steps + 1, B, ...]).
    """

    def body(x: jax.Array, i: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        x = step(x, i, jax.random.fold_in(key, i))
        return x, (x if return_trajectory else None)

    x0, xs = jax.lax.scan(body, x_T, jnp.arange(num_steps - 1, -1, -1, dtype=jnp.int32))
    if return_trajectory:
        return x0, jnp.concatenate([x_T[None], xs], axis=0)
    return x0
