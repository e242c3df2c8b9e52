"""Everything a run is built from, shared by the train and sample modes."""

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from diffusion_jax import controlnet, convert, data, latent, loading, objectives, reflow, vlb
from diffusion_jax.errors import ConfigError
from diffusion_jax.runtime import enable_compilation_cache
from diffusion_jax.training import ema_snapshots, optimizer
from diffusion_jax.training import mesh as mesh_lib
from diffusion_jax.training import state as state_lib
from diffusion_jax.training.sampling import SampleFn, make_sample_fn
from diffusion_jax.training.setup import (
    RunProcess,
    bind_process,
    build_model,
    build_process,
    check_config,
    params_key,
)
from diffusion_jax.training.step import make_train_step
from diffusion_jax.validation import validate_config


class Experiment(NamedTuple):
    # `diffusion.process`: the discrete schedule, sde.EDM, sde.Flow, or a VDM's vdm.LearnedSchedule, which sampling
    # binds to the γ of the parameters it samples with (`setup.build_process`, `setup.bind_process`)
    schedule: RunProcess
    example_shape: tuple[int, ...]
    graphdef: nnx.GraphDef
    init_state: Callable[[], state_lib.TrainState]  # jitted: the step-0 state, created sharded
    abstract_state: state_lib.TrainState  # ShapeDtypeStructs with their shardings: a restore target
    state_shardings: state_lib.TrainState  # a NamedSharding per leaf (`mesh.state_shardings`)
    tx: optax.GradientTransformation
    lr_schedule: optax.Schedule
    mesh: Mesh
    replicated: NamedSharding
    batch_sharding: NamedSharding  # batches split over ('data', 'fsdp')
    sample_fn: SampleFn  # decodes to pixels in a latent run (`with_scale_factor`)
    root_key: jax.Array
    objective: objectives.Objective  # the loss of `training.objective` (`objectives.build`)
    first_stage: latent.FirstStage | None = None  # the frozen autoencoder of a latent diffusion run


def build(config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Experiment:
    """Builds the schedule, model, optimiser, mesh, state shardings and sampler of `config`.

    Every config field is validated here, before anything is compiled. Nothing is allocated:
    the state's shapes come from `jax.eval_shape`, and `init_state()` creates it already
    sharded over the mesh (the parameters are never whole on one device). The mesh spans
    `devices` (default: every device of every process).
    """
    enable_compilation_cache(config.training.get("compilation_cache_dir"))
    mesh = mesh_lib.make_mesh(config.get("mesh"), devices)  # checks the mesh against the devices
    validate_config(config, mesh_lib.batch_shards(mesh), jax.process_count())
    ema_index(config)
    schedule = build_process(config)
    image_shape = data.example_shape(config.data)
    first_stage = latent.load_first_stage(config, image_shape, mesh_lib.replicated(mesh))  # None: pixel space
    example_shape = image_shape if first_stage is None else first_stage.latent_shape
    root_key = jax.random.key(config.seed)
    graphdef, init_params = build_model(config, example_shape)
    check_config(config, schedule, example_shape)
    objective = objectives.build(config, graphdef, schedule, example_shape)  # a teacher is loaded here
    batch_sharding = mesh_lib.batch_sharding(mesh)
    horizon = objective.lr_horizon or config.training.num_steps  # an objective may restart the optimiser
    tx = optimizer.make_optimizer(config.optim, horizon, controlnet.frozen(config))  # a ControlNet's base: frozen
    base_lr = optimizer.learning_rate_schedule(config.optim, horizon)
    importance = config.diffusion.get("timestep_sampling", "uniform") == "importance"

    def create_state(teacher: nnx.State | None, initial: nnx.State | None) -> state_lib.TrainState:
        # The objective's starting point (a copy: the state's buffers are donated), else the initialiser.
        params = init_params(params_key(config)) if initial is None else jax.tree.map(jnp.copy, initial)
        history = vlb.TimestepHistory.create(schedule.num_timesteps) if importance else None
        return state_lib.create(params, tx, state_lib.num_emas(config.training), jax.random.fold_in(root_key, 1),
                                history, teacher)

    read_pretrained = controlnet.initializer(config, init_params, schedule, example_shape)  # its base, or None
    if config.model.get("pretrained") is not None:  # a PyTorch / diffusers checkpoint: checked now, read at init
        if objective.initial_params is not None:
            raise ConfigError(f"model.pretrained: training.objective={config.training.objective!r} starts from its "
                              "own weights (a teacher's, a previous flow's); leave model.pretrained None")
        read_pretrained = convert.importer(config, init_params, example_shape)
    abstract = jax.eval_shape(create_state, objective.teacher, objective.initial_params)
    shardings = mesh_lib.state_shardings(abstract, tx, mesh, config.get("mesh"))
    teacher = None if objective.teacher is None else jax.device_put(objective.teacher, shardings.teacher)
    initial = None if objective.initial_params is None else jax.device_put(objective.initial_params, shardings.params)
    jitted_create = jax.jit(create_state, out_shardings=shardings)

    def init_state() -> state_lib.TrainState:
        """The state at step 0: from the initialiser, the objective's starting point or `model.pretrained`."""
        start = initial if read_pretrained is None else jax.device_put(read_pretrained(), shardings.params)
        return jitted_create(teacher, start)

    exp = Experiment(
        schedule=schedule,
        example_shape=example_shape,
        graphdef=graphdef,
        init_state=init_state,
        abstract_state=jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings
        ),
        state_shardings=shardings,
        tx=tx,
        lr_schedule=base_lr if objective.lr_horizon is None else lambda step: base_lr(step % horizon),
        mesh=mesh,
        replicated=mesh_lib.replicated(mesh),
        batch_sharding=batch_sharding,
        sample_fn=make_sample_fn(graphdef, schedule, config, example_shape, batch_sharding),
        root_key=root_key,
        objective=objective,
        first_stage=None if first_stage is None else first_stage._replace(scale_factor=None),
    )
    if first_stage is not None and first_stage.scale_factor is not None:
        exp = with_scale_factor(exp, first_stage.scale_factor)
    return exp


def with_scale_factor(exp: Experiment, scale_factor: float) -> Experiment:
    """A latent run's experiment once its scale factor is known: samples decoded to pixels.

    Call it once, on an experiment whose scale factor is still unknown (its sample function then
    returns latents); `build` does when the config gives the factor, `train` when it computes it."""
    first_stage = exp.first_stage._replace(scale_factor=scale_factor)
    return exp._replace(first_stage=first_stage, sample_fn=latent.decoding(exp.sample_fn, first_stage))


def jit_train_step(exp: Experiment, config: ml_collections.ConfigDict) -> "BoundStep":
    """The train step of `config`, jitted for `exp`'s mesh (traced under it: `mesh_lib.with_mesh`): the state
    keeps its shardings (donated, so updated in place), the batch arrives split over ('data', 'fsdp'), the
    metrics come back replicated. Called, lowered and compiled as `(state, batch)`: the objective's frozen
    arrays (`Objective.frozen`) are bound as its last argument, replicated, not embedded as constants."""
    jitted = jax.jit(
        mesh_lib.with_mesh(make_train_step(exp.graphdef, exp.objective, exp.tx, exp.lr_schedule, config, exp.mesh),
                           exp.mesh),
        in_shardings=(exp.state_shardings, exp.batch_sharding, exp.replicated),
        out_shardings=(exp.state_shardings, exp.replicated),
        donate_argnums=0,
    )
    frozen = None if exp.objective.frozen is None else jax.device_put(exp.objective.frozen, exp.replicated)
    return BoundStep(jitted, frozen)


class BoundStep:
    """`fn(*args, frozen)` called, lowered (`.lower(*args)`) and compiled (`.compile()`) as `fn(*args)`: a jitted
    step, its `Lowered` or its `Compiled`, with the frozen arrays bound; every other attribute (`as_text`,
    `cost_analysis`, `memory_analysis`) is `fn`'s."""

    def __init__(self, fn: Any, frozen: Any):
        self._fn, self._frozen = fn, frozen

    def __call__(self, *args: Any) -> Any:
        return self._fn(*args, self._frozen)

    def lower(self, *args: Any) -> "BoundStep":
        return BoundStep(self._fn.lower(*args, self._frozen), self._frozen)

    def compile(self) -> "BoundStep":
        return BoundStep(self._fn.compile(), self._frozen)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fn, name)


def ema_index(config: ml_collections.ConfigDict) -> int | None:
    """Which of `training.ema_decays` samples are drawn with (`sample.ema_decay`; None: raw params)."""
    return loading.ema_index(config, config.sample.ema_decay)


def restore_or_pretrained(
    config: ml_collections.ConfigDict, exp: Experiment, checkpointer: Any
) -> state_lib.TrainState:
    """The newest checkpoint of `checkpointer` (sample and eval mode); a workdir without one runs the
    `model.pretrained` weights as step 0, else it is a ConfigError naming --workdir."""
    state = checkpointer.restore_or_none(exp.abstract_state)
    if state is None and config.model.get("pretrained") is not None:
        logging.info("No checkpoint in %s: running model.pretrained=%s", checkpointer.directory,
                     config.model.pretrained)
        return exp.init_state()
    return checkpointer.restore(exp.abstract_state) if state is None else state


def sampling_params(
    config: ml_collections.ConfigDict, state: state_lib.TrainState, workdir: str | Path | None = None
) -> nnx.State:
    """The parameters `config` samples with: the power EMA of `sample.ema_sigma_rel` if set (a tracked one, or, given
    the run's `workdir`, one rebuilt post hoc from its snapshots at the state's step: `ema_snapshots.reconstruct`),
    else the EMA of `sample.ema_decay` (None: the raw parameters)."""
    sigma_rel = config.sample.get("ema_sigma_rel")
    if sigma_rel is None:
        index = ema_index(config)
        return state.params if index is None else state.ema_params[index]
    index = ema_snapshots.power_ema_slots(config).get(sigma_rel)
    if index is not None:
        return state.ema_params[index]
    if workdir is None:
        raise ConfigError(
            f"sample.ema_sigma_rel: {sigma_rel} is not among training.ema_sigma_rels "
            f"{tuple(config.training.get('ema_sigma_rels', ()))}; training samples with a tracked EMA (a post-hoc one "
            "is rebuilt from the snapshots in sample or eval mode, or by diffusion_jax.load)"
        )
    params, info = ema_snapshots.reconstruct(workdir, int(state.step), sigma_rel, state.params)
    logging.info("Sampling with the %s", ema_snapshots.summary(info))
    return params


def training_batches(
    exp: Experiment, config: ml_collections.ConfigDict, start_step: int = 0
) -> Iterator[dict[str, jax.Array]]:
    """The global batches the train step of `config` takes from step `start_step` + 1 on, placed on `exp`'s mesh:
    the dataset's (`data.create_iterator`), a reflow's (noise, sample) pairs (`flow.pairs_dir`), or a latent
    run's s · z with z ~ q(z|x) of its frozen autoencoder."""
    if exp.first_stage is not None:
        return latent.training_batches(config, exp.first_stage, exp.batch_sharding, start_step,
                                       jax.random.fold_in(exp.root_key, 5))
    pairs_dir = config.get("flow", {}).get("pairs_dir")
    pairs = None if pairs_dir is None else reflow.open_pairs(pairs_dir, exp.example_shape)
    return data.create_iterator(config.data, global_batch_size=config.training.batch_size, seed=config.seed,
                                start_step=start_step, sharding=exp.batch_sharding, pairs=pairs)


def trained_model(
    exp: Experiment, config: ml_collections.ConfigDict, state: state_lib.TrainState
) -> loading.LoadedModel:
    """The model of a train state in memory as `dj.load` gives a workdir's: the parameters `config` samples
    with (`sample.ema_decay`), its noise process and first stage, so `.sample(...)` and `.model_fn()` work
    on a run trained in a notebook."""
    params = sampling_params(config, state)
    return loading.LoadedModel(config, int(state.step), exp.graphdef, params,
                               bind_process(exp.schedule, exp.graphdef, params), exp.example_shape, exp.first_stage)
