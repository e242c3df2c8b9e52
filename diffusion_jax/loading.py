"""A trained model from a workdir, without its optimiser or train state (DESIGN §6).

    import diffusion_jax as dj
    model = dj.load("runs/ddpm_digits")              # the newest checkpoint, the EMA its config samples with
    x0 = dj.samplers.get("ddim")(model.model_fn(), model.schedule, key, x_T, steps=50,
                                 prediction=model.config.diffusion.prediction)

The config is the one saved inside the checkpoint (`Checkpointer.save`), not the workdir's loose
`config.json`, so a workdir whose config.json is missing, broken or rewritten by a later run is
read as it was trained. Only the parameters are read from disk (orbax partial restore); the
optimiser state stays there. Sample and eval modes, classifier guidance, teachers and autoencoders
all load their models through `load`.
"""

from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import ml_collections
from flax import nnx

from diffusion_jax import data, latent
from diffusion_jax.errors import ConfigError
from diffusion_jax.training import run_config
from diffusion_jax.training.checkpoint import Checkpointer
from diffusion_jax.training.setup import Process, bind_process, build_model, build_process, model_apply

_FROM_CONFIG = "config"


class LoadedModel(NamedTuple):
    """A trained network as a pure function of its parameters, with what it was trained as."""

    config: ml_collections.ConfigDict  # the config saved in the checkpoint
    step: int  # the checkpoint's step
    graphdef: nnx.GraphDef
    params: nnx.State  # the EMA `ema_decay` names (by default the config's `sample.ema_decay`), or the raw params
    schedule: Process  # the noise process of `config.diffusion` (`training.setup.build_process`; a VDM's of its γ)
    example_shape: tuple[int, ...]  # one example: [H, W, C] images (latents of a latent run) or [D] vectors
    first_stage: latent.FirstStage | None = None  # a latent run's frozen autoencoder: `first_stage.decode(x0)`

    def apply(self, x: jax.Array, t: jax.Array, cond: Any = None) -> jax.Array:
        """The network's output for inputs x [B, *example_shape] at times t [B] with conditioning `cond`."""
        return model_apply(self.graphdef, self.params, x, t, cond)

    def model_fn(self, cond: Any = None) -> Callable[[jax.Array, jax.Array], jax.Array]:
        """`model_fn(x_t, t)` with `cond` closed over: what every sampler takes."""
        return lambda x_t, t: self.apply(x_t, t, cond)


def load(
    workdir: str | Path,
    *,
    step: int | None = None,
    ema_decay: float | None | str = _FROM_CONFIG,
    sharding: jax.sharding.Sharding | None = None,
    field: str = "workdir",
) -> LoadedModel:
    """The model of a training workdir's checkpoint (`step`, default the newest readable one).

    `ema_decay`: which of the run's `training.ema_decays` to load (None: the raw parameters;
    default: its config's `sample.ema_decay`). `sharding`: where the parameters go (default the
    first device). `field` names the config field or flag that gave `workdir` in error messages,
    which are one-line `ConfigError`s: no workdir, no checkpoint, an EMA the run did not keep.
    """
    directory = Path(workdir) / "checkpoints"
    if not directory.is_dir():
        raise ConfigError(f"{field}: {workdir} has no checkpoints/ directory; train there first (--mode=train)")
    checkpointer = Checkpointer(directory)
    try:
        steps = checkpointer.all_steps()
        if step is not None:
            if step not in steps:
                raise ConfigError(f"{field}: {workdir} has no checkpoint of step {step} (it has {steps})")
            steps = [step]
        failures = []
        for candidate in reversed(steps):
            saved = checkpointer.saved_config(candidate)
            if saved is None:
                failures.append(f"step {candidate}: no readable config")
                continue
            config = ml_collections.ConfigDict(run_config.with_defaults(saved))  # fields newer than the run
            example_shape = tuple(data.example_shape(config.data))
            first_stage = latent.load_first_stage(config, example_shape, sharding)  # a latent run's autoencoder
            if first_stage is not None:
                example_shape = first_stage.latent_shape
            graphdef, init_params = build_model(config, example_shape)
            index = ema_index(config, config.sample.get("ema_decay") if ema_decay == _FROM_CONFIG else ema_decay, field)
            target = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding or _first_device()),
                jax.eval_shape(init_params, jax.random.key(0)),
            )
            wanted = {"params": target} if index is None else {
                "ema_params": [target if i == index else None for i in range(len(config.training.ema_decays))]
            }
            try:
                restored = checkpointer.restore_subtrees(candidate, wanted)
            except Exception as e:  # noqa: BLE001  a damaged checkpoint: try the next older one
                failures.append(f"step {candidate}: {type(e).__name__}")
                continue
            params = restored["params"] if index is None else restored["ema_params"][index]
            process = bind_process(build_process(config), graphdef, params)  # a VDM's: its γ's
            return LoadedModel(config, candidate, graphdef, params, process, example_shape, first_stage)
    finally:
        checkpointer.close()
    detail = f" ({'; '.join(failures)})" if failures else ""
    raise ConfigError(f"{field}: {workdir} has no checkpoint that could be read{detail}; train there first")


def _first_device() -> jax.sharding.Sharding:
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def ema_index(config: ml_collections.ConfigDict, decay: float | None, field: str = "sample.ema_decay") -> int | None:
    """Which of the run's `training.ema_decays` is the EMA of `decay` (None: the raw parameters); a decay
    the run did not keep is a ConfigError naming `field`."""
    if decay is None:
        return None
    decays = list(config.training.ema_decays)
    if decay not in decays:
        raise ConfigError(f"{field}: {decay} is not in training.ema_decays {decays} (or None: the raw parameters)")
    return decays.index(decay)
