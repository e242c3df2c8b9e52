"""Builds the pieces of a run from its config: schedule, model, and the model call.

Everything here validates its config fields and fails with a `ConfigError` naming
the field before anything is compiled.
"""

import inspect
from collections.abc import Callable

import jax
import ml_collections
from flax import nnx

from diffusion_jax import diffusion, models, samplers, schedules, sde, vlb
from diffusion_jax.data import captions
from diffusion_jax.errors import ConfigError
from diffusion_jax.schedules import Schedule

PROCESSES = ("discrete", "edm", "flow")  # what `diffusion.process` may train on
Process = Schedule | sde.EDM | sde.Flow


def build_process(config: ml_collections.ConfigDict) -> Process:
    """The run's noise process: the discrete schedule `diffusion.schedule` with `num_timesteps` steps
    ('discrete', model time = timestep index), EDM's x + σ n with model time σ ('edm'), or flow matching's
    (1 - t) x_0 + t ε with model time t ('flow', `sde.Flow`)."""
    d = config.diffusion
    process = d.get("process", "discrete")
    if (d.prediction == "velocity") != (process == "flow"):
        raise ConfigError(f"diffusion.prediction: {d.prediction!r} on diffusion.process={process!r}; the flow's "
                          "velocity ε - x_0 ('velocity') is what diffusion.process='flow' trains, and only it")
    if process == "discrete":
        return schedules.get(d.schedule, d.num_timesteps)
    if process in ("edm", "flow") and config.model.get("learn_sigma"):
        raise ConfigError(f"model.learn_sigma: True; diffusion.process={process!r} wraps a network of one output "
                          "(`models.Preconditioned`), not a learned-variance head")
    if process == "flow":
        return sde.Flow()
    if process == "edm":
        if not 0 < d.sigma_min < d.sigma_max:
            raise ConfigError(f"diffusion.sigma_min, diffusion.sigma_max: got {d.sigma_min}, {d.sigma_max}; "
                              "need 0 < sigma_min < sigma_max")
        if d.prediction != "x0":
            raise ConfigError(f"diffusion.prediction: {d.prediction!r}; diffusion.process='edm' wraps the network "
                              "in EDM's preconditioning, whose output is x̂_0: set 'x0'")
        return sde.EDM(sigma_min=d.sigma_min, sigma_max=d.sigma_max, sigma_data=d.sigma_data)
    raise ConfigError(f"diffusion.process: unknown {process!r}; choose one of: {', '.join(PROCESSES)}")


def model_kwargs(config: ml_collections.ConfigDict, example_shape: tuple[int, ...]) -> dict:
    """Constructor arguments: `config.model` (less `name`) plus the data's shape; a `model.text_encoder`
    over digits captions (`data.captions`) gets the captions' vocabulary size and length."""
    kwargs = {k: v for k, v in config.model.items() if k != "name"}
    if kwargs.get("text_encoder") is not None:
        text_encoder = dict(kwargs["text_encoder"])
        if config.data.get("captions"):
            text_encoder.update(vocab_size=captions.vocabulary().size, max_len=captions.max_caption_length())
        kwargs["text_encoder"] = text_encoder
    if len(example_shape) == 3:  # [H, W, C] images
        height, width, channels = example_shape
        if height != width:
            raise ConfigError(f"data.image_size: images must be square, got {height}x{width}")
        kwargs.update(image_size=height, in_channels=channels)
    else:  # [D] vectors
        kwargs.update(in_features=example_shape[0])
    return kwargs


def build_model(
    config: ml_collections.ConfigDict, example_shape: tuple[int, ...]
) -> tuple[nnx.GraphDef, Callable[[jax.Array], nnx.State]]:
    """(graphdef, init) of `config.model` for data of `example_shape`; init(key) -> params. Under
    `diffusion.process='edm'` or 'flow' the model is the backbone in `models.Preconditioned`.

    The constructor (and so its config checks) runs on an abstract model
    (`nnx.eval_shape`: nothing allocated or compiled). `init` is one jitted
    function, which compiles once instead of once per weight shape as eager
    initialisation does.
    """
    kwargs = model_kwargs(config, example_shape)

    def make(key: jax.Array) -> nnx.Module:
        model = models.create(config.model.name, rngs=nnx.Rngs(key), **kwargs)
        d = config.diffusion
        process = d.get("process", "discrete")
        if process == "discrete":
            return model
        # EDM's D(x; σ), or a flow's velocity at 1000 t (SD3's timestep scale)
        return models.Preconditioned(model, "flow" if process == "flow" else d.preconditioning, d.sigma_data,
                                     d.sigma_min)

    graphdef, _ = split_model(nnx.eval_shape(lambda: make(jax.random.key(0))))
    return graphdef, jax.jit(lambda key: split_model(make(key))[1])


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, params); models must hold nothing but `nnx.Param` state."""
    graphdef, params, *rest = nnx.split(model, nnx.Param, ...)
    if any(jax.tree.leaves(r) for r in rest):
        raise TypeError(f"{type(model).__name__} holds non-Param state; models must keep only nnx.Param")
    return graphdef, params


def model_apply(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    x: jax.Array,
    t: jax.Array,
    cond: jax.Array | None = None,
    *,
    train: bool = False,
    dropout_key: jax.Array | None = None,
) -> jax.Array:
    """Calls the model given by (graphdef, params) as a pure function."""
    model = nnx.merge(graphdef, params)
    rngs = nnx.Rngs(dropout=dropout_key) if dropout_key is not None else None
    return model(x, t, cond, train=train, rngs=rngs)


def sampler_from_config(sample: ml_collections.ConfigDict, learn_sigma: bool = False) -> tuple[Callable, dict]:
    """The sampler `sample.sampler` and its options taken from `sample` by name.

    A sampler's keyword-only parameters (`eta`, `variance`, `spacing`, `clip_x0`, ...)
    are filled from same-named fields of `config.sample` that are not None, so a new
    sampler gets its options from the config without glue code. A model with
    `learn_sigma` samples under 'ddpm' with its learned variance unless `sample.variance`
    says otherwise (improved DDPM); see `network_output_fn` for the other samplers.
    """
    sampler = samplers.get(sample.sampler)
    params = inspect.signature(sampler).parameters
    options = {
        name: sample[name]
        for name, p in params.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and name in sample and sample[name] is not None
    }
    if sample.get("steps") is not None:
        options["steps"] = sample.steps
    if learn_sigma and "variance" in params and "variance" not in options:
        options["variance"] = "learned_range"
    return sampler, options


def network_output_fn(learn_sigma: bool, options: dict) -> Callable[[jax.Array], jax.Array]:
    """What of a network's output a sampler gets: everything, or with `learn_sigma` and a sampler
    that does not use the learned variance, the prediction alone (the first half of the channels)."""
    if learn_sigma and options.get("variance") != "learned_range":
        return lambda out: jax.numpy.split(out, 2, axis=-1)[0]
    return lambda out: out


def check_config(config: ml_collections.ConfigDict, schedule: Process, example_shape: tuple[int, ...]) -> None:
    """Validates the fields that a run would otherwise first use late (sampling at step N).

    The sampler is traced abstractly (`jax.eval_shape`, nothing compiled) with a
    stand-in network, which runs all of its option checks.
    """
    if not isinstance(schedule, Schedule):  # what needs the discrete schedule's T steps
        process = config.diffusion.process
        if "vlb_bpd" in config.eval.get("metrics", ()):
            raise ConfigError(f"eval.metrics: 'vlb_bpd' sums the T terms of a discrete schedule; "
                              f"diffusion.process={process!r} has none (its likelihood is 'ode_bpd')")
        if config.sample.get("classifier_workdir") is not None:
            raise ConfigError(f"sample.classifier_workdir: classifier guidance runs on a discrete schedule, not "
                              f"diffusion.process={process!r}")
    diffusion.check_prediction(config.diffusion.prediction)
    diffusion.check_weighting(config.diffusion.loss_weighting)
    learn_sigma = bool(config.model.get("learn_sigma"))
    vlb.check_loss(config.diffusion.get("loss", "simple"), config.diffusion.get("timestep_sampling", "uniform"),
                   learn_sigma)
    if config.sample.get("variance") == "learned_range" and not learn_sigma:
        raise ConfigError("sample.variance: 'learned_range' needs a model trained with model.learn_sigma=True")
    sampler, options = sampler_from_config(config.sample, learn_sigma)
    x_T = jax.ShapeDtypeStruct((1, *example_shape), jax.numpy.float32)
    prediction = config.diffusion.prediction
    learned = options.get("variance") == "learned_range"

    def identity_model(x_t: jax.Array, t: jax.Array) -> jax.Array:
        return jax.numpy.concatenate([x_t, x_t], axis=-1) if learned else x_t

    key = jax.random.key(0)
    jax.eval_shape(lambda x: sampler(identity_model, schedule, key, x, prediction=prediction, **options), x_T)
