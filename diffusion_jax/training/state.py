"""The train state: one pytree holding everything a run needs to continue exactly."""

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx, struct

from diffusion_jax import posthoc_ema
from diffusion_jax.vlb import TimestepHistory


@struct.dataclass
class TrainState:
    """step, params, EMA params (one per `training.ema_decays`, then one per `training.ema_sigma_rels`), optimiser
    state and the run's base key, and with
    improved DDPM's importance-sampled L_vlb the history of each L_t (`timestep_history`, else None),
    and a distillation's frozen teacher (`teacher`, the objective's `Objective.teacher`, else None).

    Per-step randomness is `fold_in(key, step)` (as in VDM and big_vision), so the
    state needs no RNG updates and a restored run draws the same numbers.
    """

    step: jax.Array  # int32 []
    params: nnx.State
    ema_params: tuple[nnx.State, ...]  # training.ema_decays' EMAs, then training.ema_sigma_rels' power EMAs
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


def num_emas(training: ml_collections.ConfigDict) -> int:
    """How many EMAs the state of a run with config `training` keeps."""
    return len(training.ema_decays) + len(training.get("ema_sigma_rels", ()))


def ema_betas(training: ml_collections.ConfigDict) -> Callable[[jax.Array], tuple[float | jax.Array, ...]]:
    """`betas(t)`: the β of each EMA's update after step t ≥ 1, aligned with the state's `ema_params`: each constant
    decay of `training.ema_decays` (Polyak averaging), then β_γ(t) = (1 − 1/t)^(γ+1) of each power EMA of
    `training.ema_sigma_rels` (EDM2 Eq. 2; `posthoc_ema`)."""
    decays = tuple(training.ema_decays)
    gammas = tuple(posthoc_ema.gamma_from_sigma_rel(s) for s in training.get("ema_sigma_rels", ()))
    return lambda t: (*decays, *(posthoc_ema.power_beta(t, gamma) for gamma in gammas))


def update_emas(
    emas: tuple[nnx.State, ...], params: nnx.State, betas: Sequence[float | jax.Array]
) -> tuple[nnx.State, ...]:
    """ema <- β ema + (1 − β) params, for each β (`ema_betas`)."""
    return tuple(optax.incremental_update(params, ema, 1.0 - beta) for ema, beta in zip(emas, betas, strict=True))
