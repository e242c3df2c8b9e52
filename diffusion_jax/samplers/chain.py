"""The reverse-chain driver shared by the samplers, and what samplers report."""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

# step(x_t [B,...], state, i: int32 scalar step index, key) -> (x_{prev} [B,...], state).
# `state` is whatever a multistep solver carries between steps (None for one-step samplers).
StepFn = Callable[[jax.Array, Any, jax.Array, jax.Array], tuple[jax.Array, Any]]


class SampleInfo(NamedTuple):
    """What a sampler reports with `return_info=True` or `return_trajectory=True`."""

    nfe: jax.Array  # int32 []: network evaluations per example (a guided batch of 2B counts once)
    trajectory: jax.Array | None = None  # [S + 1, B, ...]: x_T first, x_0 last (return_trajectory)


def result(
    x0: jax.Array, nfe: int | jax.Array, trajectory: jax.Array | None, return_info: bool, return_trajectory: bool
) -> jax.Array | tuple[jax.Array, SampleInfo]:
    """x0, or (x0, SampleInfo) when either is asked for."""
    if not (return_info or return_trajectory):
        return x0
    return x0, SampleInfo(jnp.asarray(nfe, jnp.int32), trajectory if return_trajectory else None)


def run_chain(
    step: StepFn,
    x_T: jax.Array,
    key: jax.Array,
    num_steps: int,
    *,
    nfe: int,
    return_info: bool = False,
    return_trajectory: bool = False,
    state: Any = None,
) -> jax.Array | tuple[jax.Array, SampleInfo]:
    """Applies `step` for i = num_steps-1, ..., 0 in one `lax.scan`.

    Step i draws its noise from `fold_in(key, i)`, so a chain is a pure function of
    (key, x_T). Returns x_0, or (x_0, SampleInfo) with `nfe` (the sampler's count) and the
    trajectory [num_steps + 1, B, ...] when asked for.
    """

    def body(carry: tuple[jax.Array, Any], i: jax.Array) -> tuple[tuple[jax.Array, Any], jax.Array | None]:
        x, aux = step(*carry, i, jax.random.fold_in(key, i))
        return (x, aux), (x if return_trajectory else None)

    (x0, _), xs = jax.lax.scan(body, (x_T, state), jnp.arange(num_steps - 1, -1, -1, dtype=jnp.int32))
    trajectory = jnp.concatenate([x_T[None], xs], axis=0) if return_trajectory else None
    return result(x0, nfe, trajectory, return_info, return_trajectory)
