"""The train state: one pytree holding everything a run needs to continue exactly."""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from diffusion_jax.vlb import TimestepHistory


@struct.dataclass
class TrainState:
    """step, params, EMA params (one per decay), optimiser state and the run's base key, and with
    improved DDPM's importance-sampled L_vlb the history of each L_t (`timestep_history`, else None),
    and a distillation's frozen teacher (`teacher`, the objective's `Objective.teacher`, else None).

    Per-step randomness is `fold_in(key, step)` (as in VDM and big_vision), so the
    state needs no RNG updates and a restored run draws the same numbers.
    """

    step: jax.Array  # int32 []
    params: nnx.State
    ema_params: tuple[nnx.State, ...]  # aligned with config.training.ema_decays
    opt_state: optax.OptState
    rng: jax.Array  # uint32 raw key data; `key` wraps it
    skipped_steps: jax.Array  # int32 []: steps whose update was dropped as non-finite
    timestep_history: TimestepHistory | None = None
    teacher: nnx.State | None = None

    @property
    def key(self) -> jax.Array:
        return jax.random.wrap_key_data(self.rng)


def create(
    params: nnx.State,
    tx: optax.GradientTransformation,
    num_ema: int,
    key: jax.Array,
    timestep_history: TimestepHistory | None = None,
    teacher: nnx.State | None = None,
) -> TrainState:
    """A fresh state at step 0 whose EMAs start at the initial parameters."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=tuple(jax.tree.map(jnp.copy, params) for _ in range(num_ema)),  # own buffers: donated
        opt_state=tx.init(params),
        rng=jax.random.key_data(key),
        skipped_steps=jnp.zeros((), jnp.int32),
        timestep_history=timestep_history,
        teacher=teacher,
    )


def update_emas(emas: tuple[nnx.State, ...], params: nnx.State, decays: Sequence[float]) -> tuple[nnx.State, ...]:
    """ema <- decay * ema + (1 - decay) * params, for each decay (Polyak averaging)."""
    return tuple(optax.incremental_update(params, ema, 1.0 - decay) for ema, decay in zip(emas, decays, strict=True))
