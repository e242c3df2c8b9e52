"""Builds the pieces of a run from its config: schedule, model, and the model call.

Everything here validates its config fields and fails with a `ConfigError` naming
the field before anything is compiled.
"""

import inspect
from collections.abc import Callable

import jax
import ml_collections
from flax import nnx

from diffusion_jax import diffusion, distributed, models, repa, samplers, schedules, sde, vdm, vlb
from diffusion_jax.data import captions
from diffusion_jax.errors import ConfigError
from diffusion_jax.models.vdm_network import feature_channels
from diffusion_jax.schedules import Schedule

PROCESSES = ("discrete", "edm", "flow", "vdm")  # what `diffusion.process` may train on
Process = Schedule | sde.EDM | sde.Flow | vdm.LearnedVP  # what samplers drive
RunProcess = Process | vdm.LearnedSchedule  # what a config builds: a VDM's process waits for its parameters
VDM_DECODERS = ("discrete", "gaussian")


def build_process(config: ml_collections.ConfigDict) -> RunProcess:
    """The run's noise process: the discrete schedule `diffusion.schedule` with `num_timesteps` steps
    ('discrete', model time = timestep index), EDM's x + σ n with model time σ ('edm'), flow matching's
    (1 - t) x_0 + t ε with model time t ('flow', `sde.Flow`), or VDM's learned variance-preserving schedule
    with model time t ∈ [0, 1] ('vdm': a `vdm.LearnedSchedule`, which `bind_process` turns into the process of
    the parameters at hand)."""
    d = config.diffusion
    process = d.get("process", "discrete")
    if (d.prediction == "velocity") != (process == "flow"):
        raise ConfigError(f"diffusion.prediction: {d.prediction!r} on diffusion.process={process!r}; the flow's "
                          "velocity ε - x_0 ('velocity') is what diffusion.process='flow' trains, and only it")
    if process == "discrete":
        return schedules.get(d.schedule, d.num_timesteps)
    if process in ("edm", "flow", "vdm") and config.model.get("learn_sigma"):
        wrapper = "models.VDMNetwork" if process == "vdm" else "models.Preconditioned"
        raise ConfigError(f"model.learn_sigma: True; diffusion.process={process!r} wraps a network of one output "
                          f"(`{wrapper}`), not a learned-variance head")
    if process == "vdm":
        return vdm_schedule(config)
    if process == "flow":
        objective = config.training.get("objective")
        if config.sample.get("sampler") == "meanflow" and objective != "meanflow":
            raise ConfigError(f"sample.sampler: 'meanflow' jumps with a MeanFlow network's average velocity; this run "
                              f"is training.objective={objective!r} (sample it with 'ddim', 'heun', 'dpm_solver++' "
                              "or 'ode')")
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


def vdm_schedule(config: ml_collections.ConfigDict) -> vdm.LearnedSchedule:
    """`diffusion.process='vdm'`'s schedule, its `vdm.*` fields checked."""
    v, prediction = config.vdm, config.diffusion.prediction
    if prediction != "eps":
        raise ConfigError(f"diffusion.prediction: {prediction!r}; diffusion.process='vdm' trains VDM's ε̂(z_t; γ_t) "
                          "on its continuous VLB: set 'eps'")
    if not v.gamma_min < v.gamma_max:
        raise ConfigError(f"vdm.gamma_min, vdm.gamma_max: got {v.gamma_min}, {v.gamma_max}; need gamma_min < gamma_max "
                          "(VDM's CIFAR-10 schedule starts at -13.3 and ends at 5.0)")
    if v.decoder not in VDM_DECODERS:
        raise ConfigError(f"vdm.decoder: unknown {v.decoder!r}; choose one of: {', '.join(VDM_DECODERS)}")
    if v.decoder == "discrete" and config.latent.get("autoencoder_workdir") is not None:
        raise ConfigError("vdm.decoder: 'discrete' decodes 8-bit pixels; a latent run's data are continuous "
                          "latents: set 'gaussian'")
    if len(v.fourier) not in (0, 2) or (v.fourier and v.fourier[0] > v.fourier[1]):
        raise ConfigError(f"vdm.fourier: got {tuple(v.fourier)}; give (n_min, n_max) with n_min <= n_max (VDM: (6, 7)) "
                          "or () for none")
    return vdm.LearnedSchedule(float(v.gamma_min), float(v.gamma_max))


def bind_process(process: RunProcess, graphdef: nnx.GraphDef, params: nnx.State) -> Process:
    """`process` itself, or for a VDM run the process of `params`' learned γ (`vdm.LearnedVP`, tabulated on the
    host: in a multi-process run every process must call this with the same parameters)."""
    if not isinstance(process, vdm.LearnedSchedule):
        return process
    gamma_graphdef, gamma_params = nnx.split(nnx.merge(graphdef, params).gamma)
    return process.bind(nnx.merge(gamma_graphdef, jax.tree.map(jax.numpy.asarray, distributed.fetch(gamma_params))))


def process_memo(build: Callable[[Process], Callable]) -> Callable[[Process], Callable]:
    """`build(process)` kept for the last process it was built for: one compiled program per run, and for a
    VDM one per γ (rebuilt when training has moved it; equal γ tables give an equal `vdm.LearnedVP`)."""
    last: dict = {}

    def built(process: Process) -> Callable:
        key = process if isinstance(process, vdm.LearnedVP) else id(process)
        if key not in last:
            last.clear()
            last[key] = build(process)
        return last[key]

    return built


def model_kwargs(config: ml_collections.ConfigDict, example_shape: tuple[int, ...]) -> dict:
    """Constructor arguments: `config.model` (less `name`) plus the data's shape; a `model.text_encoder`
    over digits captions (`data.captions`) gets the captions' vocabulary size and length."""
    kwargs = {k: v for k, v in config.model.items() if k not in ("name", "pretrained")}
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
    `diffusion.process='edm'` or 'flow' the model is the backbone in `models.Preconditioned` (with
    `training.objective='meanflow'` its 'meanflow' kind, u(z, r, t)), under 'vdm' the backbone (on Fourier
    features) and the learned γ in `models.VDMNetwork`.

    The constructor (and so its config checks) runs on an abstract model
    (`nnx.eval_shape`: nothing allocated or compiled). `init` is one jitted
    function, which compiles once instead of once per weight shape as eager
    initialisation does.
    """
    kwargs = model_kwargs(config, example_shape)

    d = config.diffusion
    process = d.get("process", "discrete")
    meanflow = process == "flow" and config.training.get("objective") == "meanflow"
    if meanflow:  # u(z, r, t) embeds the interval t - r beside t
        kwargs["interval_embedding"] = True
    if repa.weight(config) > 0:  # REPA's tap and projector to the encoder's width
        kwargs.update(repa_layer=config.repa.layer,
                      repa_dim=repa.encoder_width(config.repa.encoder, config.repa.get("encoder_path")))
    if process == "vdm":  # the backbone reads the Fourier features and predicts the data's channels
        fourier = tuple(config.vdm.fourier) or None
        name, size = ("in_channels", "out_channels") if "in_channels" in kwargs else ("in_features", "out_features")
        kwargs.update({name: feature_channels(kwargs[name], fourier), size: kwargs[name]})

    def make(key: jax.Array) -> nnx.Module:
        rngs = nnx.Rngs(key)
        model = models.create(config.model.name, rngs=rngs, **kwargs)
        if process == "discrete":
            return model
        if process == "vdm":
            v = config.vdm
            gamma = vdm.MonotonicGamma(v.gamma_min, v.gamma_max, v.gamma_hidden, rngs=rngs)
            return models.VDMNetwork(model, gamma, v.gamma_min, v.gamma_max, tuple(v.fourier) or None)
        # EDM's D(x; σ), or a flow's velocity at 1000 t (SD3's timestep scale), or MeanFlow's average velocity
        kind = ("meanflow" if meanflow else "flow") if process == "flow" else d.preconditioning
        time_scale = {"time_scale": config.meanflow.time_scale} if meanflow else {}
        return models.Preconditioned(model, kind, d.sigma_data, d.sigma_min, **time_scale)

    graphdef, _ = split_model(nnx.eval_shape(lambda: make(jax.random.key(0))))
    return graphdef, jax.jit(lambda key: split_model(make(key))[1])


def params_key(config: ml_collections.ConfigDict) -> jax.Array:
    """The key a new run draws its initial parameters with (`training.experiment`; the weight importer draws what
    a checkpoint lacks, such as a first stage's discriminator, with it too)."""
    return jax.random.fold_in(jax.random.key(config.seed), 0)


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
    modules: list[nnx.Module] | None = None,
) -> jax.Array:
    """Calls the model given by (graphdef, params) as a pure function; with `modules`, appends the module it
    called there, so that the caller can read what the call sowed (REPA's tap, `objectives.with_alignment`)."""
    model = nnx.merge(graphdef, params)
    if modules is not None:
        modules.append(model)
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


def guided_channels(config: ml_collections.ConfigDict, options: dict, example_shape: tuple[int, ...]) -> int | None:
    """The output channels classifier-free guidance combines (`guidance.classifier_free(channels=...)`):
    `sample.guidance_channels`, else with a learned variance the sampler uses, the prediction's (the variance,
    the second half, stays conditional); None: all."""
    channels = config.sample.get("guidance_channels")
    if channels is None and config.model.get("learn_sigma") and options.get("variance") == "learned_range":
        channels = example_shape[-1]
    return channels


def check_config(config: ml_collections.ConfigDict, schedule: RunProcess, example_shape: tuple[int, ...]) -> None:
    """Validates the fields that a run would otherwise first use late (sampling at step N).

    The sampler is traced abstractly (`jax.eval_shape`, nothing compiled) with a
    stand-in network, which runs all of its option checks.
    """
    if not isinstance(schedule, Schedule):  # what needs the discrete schedule's T steps
        process = config.diffusion.process
        if "vlb_bpd" in config.eval.get("metrics", ()) and process != "vdm":  # VDM's is its continuous VLB
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
    if isinstance(schedule, vdm.LearnedSchedule):
        schedule = schedule.nominal()
    jax.eval_shape(lambda x: sampler(identity_model, schedule, key, x, prediction=prediction, **options), x_T)
