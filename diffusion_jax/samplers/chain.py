"""The reverse-chain driver shared by the samplers, what samplers report, and the edits a chain takes."""

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.errors import ConfigError
from diffusion_jax.samplers.levels import NoiseLevels

# step(x_t [B,...], state, i: int32 scalar step index, key) -> (x_{prev} [B,...], state).
# `state` is whatever a multistep solver carries between steps (None for one-step samplers).
StepFn = Callable[[jax.Array, Any, jax.Array, jax.Array], tuple[jax.Array, Any]]


class Landing(NamedTuple):
    """Where the state after each step i lies: x = alpha[i] x_0 + sigma[i] eps, float64 [N] each. For most
    samplers the level step i - 1 reads (`NoiseLevels.alpha_to`, `sigma_to`); a consistency sampler's state is
    a clean estimate (alpha = 1, sigma = 0) after every step."""

    alpha: np.ndarray
    sigma: np.ndarray


class ChainEdit(Protocol):
    """A change to a reverse chain that every `run_chain` sampler takes as `edit=` (`diffusion_jax.editing`):
    where it starts, which steps it visits, and what happens around each step.

    `order` lists the chain's operations: i >= 0 is reverse step i (level i to where it lands); -(i + 1) is
    step i undone, the forward process from its landing back to level i (RePaint's jumps). The plain chain is
    N - 1, ..., 0."""

    def order(self, num_steps: int) -> np.ndarray:
        """int32 [M] operations, as above."""
        ...

    def start(self, x_T: jax.Array, levels: NoiseLevels) -> jax.Array:
        """The chain's first state from the sampler's x_T [B, ...] at its top level."""
        ...

    def wrap(self, step: StepFn, levels: NoiseLevels, landing: Landing) -> StepFn:
        """The step run for each operation of `order` (its index argument is the operation)."""
        ...


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
    levels: NoiseLevels | None = None,
    landing: Landing | None = None,
    edit: ChainEdit | None = None,
) -> jax.Array | tuple[jax.Array, SampleInfo]:
    """Applies `step` for i = num_steps-1, ..., 0 in one `lax.scan`.

    Step i draws its noise from `fold_in(key, i)`, so a chain is a pure function of
    (key, x_T). Returns x_0, or (x_0, SampleInfo) with `nfe` (the sampler's count) and the
    trajectory [num_steps + 1, B, ...] when asked for.

    With an `edit` (`ChainEdit`: inpainting, RePaint, SDEdit), the sampler's `levels` (and `landing`, by
    default each step's `alpha_to` / `sigma_to`) say where its states lie; the chain then starts at
    `edit.start(x_T)`, visits `edit.order`'s operations (the m-th draws from `fold_in(key, m)`) with the
    edit's step, and counts NFE per reverse step. Undoing steps needs a sampler whose state is the noisy image
    with nothing carried between steps and the same NFE on each; others are a ConfigError.
    """
    order = np.arange(num_steps - 1, -1, -1, dtype=np.int32)
    if edit is not None:
        if levels is None:
            raise ValueError("run_chain: an edit needs the sampler's levels")
        order = np.asarray(edit.order(num_steps), np.int32)
        if (order < 0).any() and (state is not None or nfe % num_steps or landing is not None):
            raise ConfigError(
                "sample.inpaint_method: 'repaint' undoes steps, which needs a sampler whose state is the noisy "
                "image, with nothing carried between steps and the same NFE on each (ddpm, ddim, euler, pc, "
                "langevin); not a multistep solver, heun or consistency"
            )
        landing = Landing(levels.alpha_to, levels.sigma_to) if landing is None else landing
        nfe = nfe // num_steps * int((order >= 0).sum()) if (order < 0).any() else nfe
        x_T = edit.start(x_T, levels)
        step = edit.wrap(step, levels, landing)
        draws = jnp.arange(len(order), dtype=jnp.int32)  # the m-th operation's noise: fold_in(key, m)
    else:
        draws = jnp.asarray(order)

    def body(carry: tuple[jax.Array, Any], op: tuple[jax.Array, jax.Array]) -> tuple[tuple, jax.Array | None]:
        i, draw = op
        x, aux = step(*carry, i, jax.random.fold_in(key, draw))
        return (x, aux), (x if return_trajectory else None)

    (x0, _), xs = jax.lax.scan(body, (x_T, state), (jnp.asarray(order), draws))
    trajectory = jnp.concatenate([x_T[None], xs], axis=0) if return_trajectory else None
    return result(x0, nfe, trajectory, return_info, return_trajectory)
