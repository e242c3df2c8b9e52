"""The reverse-chain driver shared by the samplers."""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

# step(x_t [B,...], state, i: int32 scalar step index, key) -> (x_{prev} [B,...], state).
# `state` is whatever a multistep solver carries between steps (None for one-step samplers).
StepFn = Callable[[jax.Array, Any, jax.Array, jax.Array], tuple[jax.Array, Any]]


def run_chain(
    step: StepFn,
    x_T: jax.Array,
    key: jax.Array,
    num_steps: int,
    return_trajectory: bool,
    state: Any = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Applies `step` for i = num_steps-1, ..., 0 in one `lax.scan`.

    Step i draws its noise from `fold_in(key, i)`, so a chain is a pure function
    of (key, x_T). Returns x_0, or (x_0, trajectory [num_steps + 1, B, ...]).
    """

    def body(carry: tuple[jax.Array, Any], i: jax.Array) -> tuple[tuple[jax.Array, Any], jax.Array | None]:
        x, aux = step(*carry, i, jax.random.fold_in(key, i))
        return (x, aux), (x if return_trajectory else None)

    (x0, _), xs = jax.lax.scan(body, (x_T, state), jnp.arange(num_steps - 1, -1, -1, dtype=jnp.int32))
    if return_trajectory:
        return x0, jnp.concatenate([x_T[None], xs], axis=0)
    return x0
