"""Everything a run is built from, shared by the train and sample modes."""

from typing import NamedTuple

import jax
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from diffusion_jax import data, vlb
from diffusion_jax.errors import ConfigError
from diffusion_jax.schedules import Schedule
from diffusion_jax.training import mesh as mesh_lib
from diffusion_jax.training import optimizer
from diffusion_jax.training import state as state_lib
from diffusion_jax.training.sampling import SampleFn, make_sample_fn
from diffusion_jax.training.setup import build_model, build_schedule, check_config
from diffusion_jax.validation import validate_config


class Experiment(NamedTuple):
    schedule: Schedule
    example_shape: tuple[int, ...]
    graphdef: nnx.GraphDef
    initial_state: state_lib.TrainState  # on the host; replicate or use as a restore target
    tx: optax.GradientTransformation
    lr_schedule: optax.Schedule
    mesh: Mesh
    replicated: NamedSharding
    batch_sharding: NamedSharding
    sample_fn: SampleFn
    root_key: jax.Array


def build(config: ml_collections.ConfigDict) -> Experiment:
    """Builds the schedule, model, optimiser, mesh and sampler of `config`.

    Every config field is validated here, before anything is compiled.
    """
    validate_config(config, jax.device_count(), jax.process_count())
    ema_index(config)
    schedule = build_schedule(config)
    example_shape = data.example_shape(config.data)
    root_key = jax.random.key(config.seed)
    graphdef, init_params = build_model(config, example_shape)
    check_config(config, schedule, example_shape)
    params = init_params(jax.random.fold_in(root_key, 0))
    mesh = mesh_lib.make_data_mesh()
    batch_sharding = mesh_lib.batch_sharding(mesh)
    tx = optimizer.make_optimizer(config.optim, config.training.num_steps)
    importance = config.diffusion.get("timestep_sampling", "uniform") == "importance"
    history = vlb.TimestepHistory.create(schedule.num_timesteps) if importance else None
    state = state_lib.create(params, tx, len(config.training.ema_decays), jax.random.fold_in(root_key, 1), history)
    return Experiment(
        schedule=schedule,
        example_shape=example_shape,
        graphdef=graphdef,
        initial_state=state,
        tx=tx,
        lr_schedule=optimizer.learning_rate_schedule(config.optim, config.training.num_steps),
        mesh=mesh,
        replicated=mesh_lib.replicated(mesh),
        batch_sharding=batch_sharding,
        sample_fn=make_sample_fn(graphdef, schedule, config, example_shape, batch_sharding),
        root_key=root_key,
    )


def ema_index(config: ml_collections.ConfigDict) -> int | None:
    """Which of `training.ema_decays` samples are drawn with (`sample.ema_decay`; None: raw params)."""
    decay = config.sample.ema_decay
    if decay is None:
        return None
    decays = list(config.training.ema_decays)
    if decay not in decays:
        raise ConfigError(f"sample.ema_decay: {decay} is not in training.ema_decays {decays} (or None: raw params)")
    return decays.index(decay)


def sampling_params(config: ml_collections.ConfigDict, state: state_lib.TrainState) -> nnx.State:
    index = ema_index(config)
    return state.params if index is None else state.ema_params[index]
