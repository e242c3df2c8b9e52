"""A trained model from a workdir, without its optimiser or train state (DESIGN §6).

    import diffusion_jax as dj
    model = dj.load("runs/ddpm_digits")              # the newest checkpoint, the EMA its config samples with
    images = model.sample(key, 16, sampler="dpm_solver++", steps=20)  # [16, H, W, C] in [-1, 1]
    x0 = dj.samplers.get("ddim")(model.model_fn(), model.schedule, key, x_T, steps=50,
                                 prediction=model.config.diffusion.prediction)  # the same, by hand

The config is the one saved inside the checkpoint (`Checkpointer.save`), not the workdir's loose
`config.json`, so a workdir whose config.json is missing, broken or rewritten by a later run is
read as it was trained. Only the parameters are read from disk (orbax partial restore); the
optimiser state stays there. Sample and eval modes, classifier guidance, teachers and autoencoders
all load their models through `load`.
"""

import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from flax import nnx

from diffusion_jax import conditioning, data, guidance, latent, sde
from diffusion_jax.errors import ConfigError
from diffusion_jax.training import ema_snapshots, run_config
from diffusion_jax.training.checkpoint import Checkpointer
from diffusion_jax.training.setup import (
    Process,
    bind_process,
    build_model,
    build_process,
    guided_channels,
    model_apply,
    network_output_fn,
    sampler_from_config,
)
from diffusion_jax.training.state import num_emas

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

    def sample(
        self,
        key: jax.Array,
        num_samples: int,
        *,
        sampler: str | None = None,
        cond: conditioning.Cond = None,
        guidance_scale: float | None | str = _FROM_CONFIG,
        guide: "LoadedModel | None" = None,
        **options: Any,
    ) -> jax.Array:
        """`num_samples` samples [N, *example_shape] as the run's sample mode draws them, compiled as one program.

        `sampler` (default the config's `sample.sampler`) takes its options (`steps`, `eta`, `spacing`,
        `clip_x0`, ...) from the same-named `config.sample` fields, `options` that are not None overriding
        them; x_T comes from the process's prior (N(0, σ_max² I) for EDM). A class-conditional model gets `cond`, by
        default the labels 0, 1, 2, ... cycling, and classifier-free guidance at `guidance_scale`
        (s = 1 + w; default the config's `sample.guidance_scale`; None or 1: none); with a `guide` (a weaker
        version of this model, `check_guide`), autoguidance at that scale instead. A learned variance
        is used where the sampler can ('ddpm'). A latent run's samples are decoded to pixels. An option
        the sampler does not take is a ConfigError naming it and the ones it does. Classifier guidance and
        edits are not applied here: compose `dj.guidance` and `dj.editing` with `model_fn` for those.
        """
        sample_config = ml_collections.ConfigDict(self.config.sample.to_dict())
        sample_config.sampler = sampler or sample_config.sampler
        learn_sigma = bool(self.config.model.get("learn_sigma"))
        sampler_fn, config_options = sampler_from_config(sample_config, learn_sigma)  # an unknown name: ConfigError
        # Everything after (model_fn, schedule, key, x_T) but what this method passes itself.
        allowed = set(list(inspect.signature(sampler_fn).parameters)[4:]) - {"prediction", "return_info",
                                                                              "return_trajectory"}
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise ConfigError(f"sample(options): the {sample_config.sampler!r} sampler has no option {unknown[0]!r}; "
                              f"it takes {sorted(allowed)}")
        options = config_options | {name: value for name, value in options.items() if value is not None}
        output = network_output_fn(learn_sigma, options)
        num_classes = self.config.model.get("num_classes")
        if cond is None and num_classes is not None:
            cond = jnp.arange(num_samples, dtype=jnp.int32) % num_classes  # as sample mode labels a batch
        scale = self.config.sample.get("guidance_scale") if guidance_scale == _FROM_CONFIG else guidance_scale
        first_stage = self.first_stage
        channels = guided_channels(self.config, options, self.example_shape)

        def network(params: nnx.State, x_t: jax.Array, t: jax.Array, cond: conditioning.Cond) -> jax.Array:
            return output(model_apply(self.graphdef, params, x_t, t, cond))

        if guide is not None:
            check_guide(self.config, self.example_shape, guide, "sample(guide)")
            guide_output = network_output_fn(bool(guide.config.model.get("learn_sigma")), {})

        def draw(
            params: nnx.State, guide_params: nnx.State | None, key: jax.Array, cond: conditioning.Cond
        ) -> jax.Array:
            noise_key, chain_key = jax.random.split(key)
            x_T = sde.as_process(self.schedule).prior_sample(noise_key, (num_samples, *self.example_shape))
            guide_fn = None
            if guide is not None:

                def guide_fn(x_t: jax.Array, t: jax.Array) -> jax.Array:
                    return guide_output(model_apply(guide.graphdef, guide_params, x_t, t, cond))

            model_fn = guidance.guided_model_fn(functools.partial(network, params), cond, scale, num_classes, channels,
                                                guide_fn)
            x0 = sampler_fn(model_fn, self.schedule, chain_key, x_T, prediction=self.config.diffusion.prediction,
                            **options)
            return x0 if first_stage is None else first_stage.decode(x0)

        return jax.jit(draw)(self.params, None if guide is None else guide.params, key, cond)


def load(
    workdir: str | Path,
    *,
    step: int | None = None,
    ema_decay: float | None | str = _FROM_CONFIG,
    ema_sigma_rel: float | None | str = _FROM_CONFIG,
    sharding: jax.sharding.Sharding | None = None,
    field: str = "workdir",
) -> LoadedModel:
    """The model of a training workdir's checkpoint (`step`, default the newest readable one).

    `ema_decay`: which of the run's `training.ema_decays` to load (None: the raw parameters;
    default: its config's `sample.ema_decay`). `ema_sigma_rel`, when not None (default: its config's
    `sample.ema_sigma_rel`), takes precedence: the power EMA of that σ_rel, tracked by the run
    (`training.ema_sigma_rels`) or rebuilt post hoc from its snapshots at the checkpoint's step
    (`training.ema_snapshots.reconstruct`; EDM2). `sharding`: where the parameters go (default the
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
            sigma_rel = config.sample.get("ema_sigma_rel") if ema_sigma_rel == _FROM_CONFIG else ema_sigma_rel
            if sigma_rel is None:
                index = ema_index(config, config.sample.get("ema_decay") if ema_decay == _FROM_CONFIG else ema_decay,
                                  field)
            else:
                index = ema_snapshots.power_ema_slots(config).get(float(sigma_rel), "post hoc")
            target = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding or _first_device()),
                jax.eval_shape(init_params, jax.random.key(0)),
            )
            if index == "post hoc":
                params, info = ema_snapshots.reconstruct(workdir, candidate, float(sigma_rel), target,
                                                         field=f"{field} (ema_sigma_rel)")
                logging.info("%s: the %s", workdir, ema_snapshots.summary(info))
            else:
                wanted = {"params": target} if index is None else {
                    "ema_params": [target if i == index else None for i in range(num_emas(config.training))]
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


def check_guide(
    config: ml_collections.ConfigDict, example_shape: tuple[int, ...], guide: LoadedModel, field: str
) -> None:
    """That `guide` can autoguide the model of `config` (`guidance.autoguidance`): the same examples, noise
    process and prediction (their outputs are combined at the same x_t and t) and the same conditioning.
    Anything else is a one-line ConfigError naming `field`."""
    ours, theirs = config.diffusion, guide.config.diffusion
    if theirs.get("process", "discrete") != ours.get("process", "discrete") or ours.get("process") == "vdm":
        raise ConfigError(f"{field}: autoguidance needs the model's fixed noise process; the guide's diffusion.process "
                          f"is {theirs.get('process')!r}, the model's {ours.get('process')!r} (a learned 'vdm' one "
                          "differs per model)")
    for name in ("schedule", "num_timesteps", "prediction"):
        if theirs.get(name) != ours.get(name):
            raise ConfigError(f"{field}: the guide's diffusion.{name} is {theirs.get(name)!r}, the model's "
                              f"{ours.get(name)!r}; autoguidance combines predictions of the same kind at the same t")
    if tuple(guide.example_shape) != tuple(example_shape):
        raise ConfigError(f"{field}: the guide makes examples {tuple(guide.example_shape)}, the model "
                          f"{tuple(example_shape)}")
    for name in ("num_classes", "text_encoder"):
        if guide.config.model.get(name) != config.model.get(name):
            raise ConfigError(f"{field}: the guide's model.{name} is {guide.config.model.get(name)!r}, the model's "
                              f"{config.model.get(name)!r}; it is called with the model's conditioning")


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
