"""The training objectives: one table from `training.objective` to the loss the train step minimises.

The train step (`training.step`) never branches on the objective: it asks `build(config, graphdef,
schedule)` for an `Objective` and differentiates `objective.loss(params, state, inputs)`. An entry
says what the loss needs (the batch, its condition, keys, the pre-update train state for its EMA
target, teacher or timestep history) and which of its auxiliary outputs are logged.

  'denoise'     the diffusion loss of `diffusion.loss`: L_simple with `diffusion.loss_weighting`
                (Ho et al. 2020, Eq. 14; `diffusion.simple_loss`), iDDPM's L_hybrid or L_vlb
                (Nichol & Dhariwal 2021, §3.1; `vlb`)
  'classify'    a noise-aware classifier's cross-entropy on noised images, for classifier guidance
                (Dhariwal & Nichol 2021, §4; `classifier_loss`); the labels are targets, not a condition
  'autoencode'  LDM's first stage: L_rec + β·KL + the patch GAN, and its discriminator's hinge loss
                (Rombach et al. 2022, Appendix G; `autoencoder_loss`)
  'distill'     progressive distillation of the `distill.teacher_workdir` run into a student that
                takes half its DDIM steps, round after round (Salimans & Ho 2022; `distill.progressive`)
  'edm'         EDM's λ(σ)-weighted denoising loss at lognormal σ on `diffusion.process='edm'`, whose
                network is the preconditioned D(x; σ) (Karras et al. 2022, Eq. 8; `edm_loss`)
  'flow_matching' flow matching / rectified flow: the velocity ε - x_0 of x_t = (1 - t) x_0 + t ε on
                `diffusion.process='flow'`, t uniform or logit-normal, ε fresh or reflow's pairs
                (Lipman et al. 2022; Liu et al. 2022; Esser et al. 2024; `flow`)
  'meanflow'    MeanFlow's average velocity u(z_t, r, t) on `diffusion.process='flow'`, regressed on the MeanFlow
                identity's target through one `jax.jvp` of the network, for one-step sampling (Geng et al. 2025;
                `meanflow`)
  'vdm'         VDM's continuous-time VLB in bits/dim with antithetic t, its learned monotonic γ trained
                by the variance-minimising gradient, on `diffusion.process='vdm'` (Kingma et al. 2021,
                Eq. 17, §5.3; `vdm`)
  'consistency' consistency distillation from `consistency.teacher_workdir`'s probability-flow ODE, or
                consistency training without it (Song et al. 2023; iCT, Song & Dhariwal 2023;
                `distill.consistency`)

Each entry trains on one kind of `diffusion.process`: 'edm' and 'consistency' on 'edm',
'flow_matching' and 'meanflow' on 'flow', 'vdm' on 'vdm', the others on the discrete schedule ('autoencode' on none).

Register a new objective with `@OBJECTIVES.register(name)` on a builder
`(config, graphdef, schedule, example_shape) -> Objective`. The math lives in the family's module
(`diffusion`, `vlb`, `classifier_loss`, `autoencoder_loss`, `distill`); a builder only wires it to
the network, the config and the train state.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from diffusion_jax import (
    autoencoder_loss,
    classifier_loss,
    conditioning,
    diffusion,
    edm_loss,
    flow,
    meanflow,
    reflow,
    repa,
    vdm,
    vlb,
)
from diffusion_jax.distill import consistency, progressive
from diffusion_jax.errors import ConfigError
from diffusion_jax.metrics import image_quality
from diffusion_jax.registry import Registry
from diffusion_jax.training import run_config
from diffusion_jax.training.setup import RunProcess, model_apply, network_output_fn


class LossInputs(NamedTuple):
    """What the loss of one (micro)batch sees besides the parameters and the train state."""

    images: jax.Array  # [B, ...] the data in [-1, 1] (s·z latents in a latent run)
    labels: jax.Array  # int32 [B]
    cond: conditioning.Cond  # the network's condition, context dropout already applied
    key: jax.Array  # draws the loss's times and noise
    dropout_key: jax.Array  # the network's dropout
    noise: jax.Array | None = None  # [B, ...] noise paired with `images` (reflow's coupling), else None
    # Where `network` records each module it calls (REPA reads what the call sowed); None: nowhere.
    taps: list | None = None
    # The objective's frozen arrays (`Objective.frozen`), as the step received them; None: it has none.
    frozen: dict[str, Any] | None = None


LossFn = Callable[[nnx.State, Any, LossInputs], tuple[jax.Array, dict[str, jax.Array]]]


class Objective(NamedTuple):
    """An entry of the table: the loss and how the step, the train state and the logs treat it."""

    loss: LossFn  # (params, state (training.state.TrainState, before this step's update), inputs) -> (loss, aux)
    metrics: tuple[str, ...] = ()  # scalar aux entries logged every step beside loss and grad_norm
    shown: tuple[str, ...] = ("loss", "grad_norm", "images_per_sec", "mfu")  # the progress line's metrics
    conditions_model: bool = True  # the batch's labels condition the network (False: they are its targets)
    # Frozen parameters the loss reads as `state.teacher` (a distillation teacher): put into the train
    # state at step 0, so checkpointed and restored with it.
    teacher: nnx.State | None = None
    # (state, tx) -> state at the start of every step, inside the jitted step (progressive distillation:
    # a new round's teacher, EMAs and optimiser state); None: nothing.
    advance: Callable[[Any, optax.GradientTransformation], Any] | None = None
    # The steps the optimiser's learning-rate schedule spans (an `advance` that restarts the optimiser every
    # so many steps); None: training.num_steps.
    lr_horizon: int | None = None
    # The parameters training starts from (a copy; a teacher's, or reflow's previous flow); None: the model's
    # initialiser.
    initial_params: nnx.State | None = None
    # Frozen arrays the loss reads as `inputs.frozen` and nothing saves (REPA's encoder, loaded from its own
    # file each run), by name. The jitted step takes them as an argument (`experiment.jit_train_step`): closed
    # over, XLA would embed them in the program as constants (661 MB of StableHLO for DINOv2-B).
    frozen: dict[str, Any] | None = None


Builder = Callable[[ml_collections.ConfigDict, nnx.GraphDef, RunProcess, tuple[int, ...]], Objective]
OBJECTIVES: Registry[Builder] = Registry("objective", "training.objective")


def build(
    config: ml_collections.ConfigDict, graphdef: nnx.GraphDef, schedule: RunProcess, example_shape: tuple[int, ...]
) -> Objective:
    """The objective of `training.objective` for this model, noise schedule and example shape [H, W, C], with
    REPA's alignment loss added when `repa.weight` > 0."""
    name = config.training.get("objective", "denoise")
    objective = OBJECTIVES.get(name)(config, graphdef, schedule, example_shape)
    return with_alignment(objective, config, name) if repa.weight(config) > 0 else objective


def with_alignment(objective: Objective, config: ml_collections.ConfigDict, name: str) -> Objective:
    """`objective` plus λ L_REPA (`diffusion_jax.repa`): the cosine alignment of the projection the backbone sowed
    at `repa.layer` during the loss's forward pass on x_t with the frozen `repa.encoder`'s features of x_0,
    pooled onto the encoder's grid; logged as 'repa' (-mean cosine, -1 at perfect alignment)."""
    if name not in repa.OBJECTIVES:
        raise ConfigError(f"repa.weight: {repa.weight(config)}; REPA aligns the one forward pass of "
                          f"training.objective {', '.join(map(repr, repa.OBJECTIVES))}, not {name!r}")
    if config.latent.get("autoencoder_workdir") is not None:
        raise ConfigError("repa.weight: REPA's encoder reads the pixel images; this run trains on latents")
    encoder = repa.encoder(config.repa.encoder, config.repa.get("encoder_path"),
                           config.repa.get("encoder_resolution", repa.RESOLUTION))
    weight = repa.weight(config)

    def loss(params: nnx.State, state: Any, inputs: LossInputs) -> tuple[jax.Array, dict[str, jax.Array]]:
        taps: list[nnx.Module] = []
        value, aux = objective.loss(params, state, inputs._replace(taps=taps))
        target = encoder.apply(inputs.frozen["repa_encoder"], inputs.images)  # [B, h, w, D]
        projected = repa.pool_to_grid(repa.sown_features(taps), target.shape[1:3])
        alignment = repa.alignment_loss(projected, target)
        return value + weight * alignment, aux | {"repa": alignment}

    shown = objective.shown[:1] + ("repa",) + objective.shown[1:]
    return objective._replace(loss=loss, metrics=objective.metrics + ("repa",), shown=shown,
                              frozen=(objective.frozen or {}) | {"repa_encoder": encoder.params})


def network(graphdef: nnx.GraphDef, params: nnx.State, inputs: LossInputs) -> diffusion.ModelFn:
    """`model_fn(x_t, t)` of the network in training mode, conditioned on `inputs.cond`."""

    def model_fn(x_t: jax.Array, t: jax.Array) -> jax.Array:
        return model_apply(graphdef, params, x_t, t, inputs.cond, train=True, dropout_key=inputs.dropout_key,
                           modules=inputs.taps)

    return model_fn


@OBJECTIVES.register("denoise")
def denoise(
    config: ml_collections.ConfigDict, graphdef: nnx.GraphDef, schedule: RunProcess, example_shape: tuple[int, ...]
) -> Objective:
    """`diffusion.loss`: 'simple' (with `loss_weighting`, `min_snr_gamma`), 'hybrid' (`vlb_weight`) or
    'vlb' (with `timestep_sampling='importance'`, t drawn from the state's `timestep_history`)."""
    require_process(config, "discrete")
    d = config.diffusion
    loss_name, prediction = d.get("loss", "simple"), d.prediction

    def loss(params: nnx.State, state: Any, inputs: LossInputs) -> tuple[jax.Array, dict[str, jax.Array]]:
        model_fn = network(graphdef, params, inputs)
        if loss_name == "simple":
            return diffusion.simple_loss(model_fn, schedule, inputs.images, inputs.key, prediction=prediction,
                                         weighting=d.loss_weighting, min_snr_gamma=d.min_snr_gamma)
        if loss_name == "hybrid":
            value, aux = vlb.hybrid_loss(model_fn, schedule, inputs.images, inputs.key, prediction=prediction,
                                         vlb_weight=d.vlb_weight)
        else:
            value, aux = vlb.vlb_loss(model_fn, schedule, inputs.images, inputs.key, prediction=prediction,
                                      history=state.timestep_history)
        # One-sample L_t in bits/dim: its mean over t is L_vlb / T less the prior term.
        return value, aux | {"vlb_term": jnp.mean(aux["vlb"])}

    return Objective(loss, metrics=("vlb_term",) if loss_name in ("hybrid", "vlb") else ())


@OBJECTIVES.register("classify")
def classify(
    config: ml_collections.ConfigDict, graphdef: nnx.GraphDef, schedule: RunProcess, example_shape: tuple[int, ...]
) -> Objective:
    """The classifier's logits [B, K] on x_t ~ q(x_t | x_0) at t ~ U{0..T-1}; targets are the labels."""
    require_process(config, "discrete")

    def loss(params: nnx.State, state: Any, inputs: LossInputs) -> tuple[jax.Array, dict[str, jax.Array]]:
        logits_fn = network(graphdef, params, inputs)
        return classifier_loss.noisy_classifier_loss(logits_fn, schedule, inputs.images, inputs.labels, inputs.key)

    return Objective(loss, metrics=("accuracy",), shown=("loss", "accuracy", "grad_norm", "mfu"),
                     conditions_model=False)


FIRST_STAGE_METRICS = ("rec", "kl", "g_adv", "d_weight", "d_loss", "psnr")


@OBJECTIVES.register("autoencode")
def autoencode(
    config: ml_collections.ConfigDict, graphdef: nnx.GraphDef, schedule: RunProcess, example_shape: tuple[int, ...]
) -> Objective:
    """LDM's first stage on a `models.FirstStage` (`config.autoencode`: kl_weight, disc_start,
    disc_weight, rec_kind, pixel_reduction); no diffusion schedule is used."""
    options = dict(config.get("autoencode", {}))

    def loss(params: nnx.State, state: Any, inputs: LossInputs) -> tuple[jax.Array, dict[str, jax.Array]]:
        return first_stage_loss(graphdef, params, inputs.images, inputs.key, state.step, options)

    return Objective(loss, metrics=FIRST_STAGE_METRICS, shown=("loss", "rec", "kl", "d_loss", "psnr",
                                                               "images_per_sec"))


def first_stage_loss(
    graphdef: nnx.GraphDef, params: nnx.State, images: jax.Array, key: jax.Array, step: jax.Array, options: dict
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """LDM's first-stage objective (Appendix G) on a `models.FirstStage`: the autoencoder's loss
    L_rec + kl_weight L_KL + disc_factor d_weight L_adv (`autoencoder_loss.autoencoder_loss`) plus the
    patch discriminator's hinge loss (`autoencoder_loss.discriminator_loss`) on the same reconstruction.

    The two are summed with stop-gradients across (the discriminator is a constant in the first, the
    reconstruction in the second), so one gradient of the sum is each loss's gradient in its own
    parameters.
    """
    model = nnx.merge(graphdef, params)
    ae_graphdef, ae_params = nnx.split(model.autoencoder)
    discriminator = None
    if model.discriminator is not None:
        disc_graphdef, disc_params = nnx.split(model.discriminator)
        discriminator = (disc_graphdef, jax.lax.stop_gradient(disc_params))
    loss, aux = autoencoder_loss.autoencoder_loss(
        ae_params, ae_graphdef, images, key, discriminator, step,
        **{k: options[k] for k in ("kl_weight", "disc_start", "disc_weight", "rec_kind", "pixel_reduction")
           if k in options},
    )
    x_rec = jax.lax.stop_gradient(aux.pop("reconstruction"))
    aux["psnr"] = jnp.mean(image_quality.psnr(images, jnp.clip(x_rec, -1.0, 1.0)))
    aux["d_loss"] = jnp.zeros(())
    if model.discriminator is not None:
        d_loss, d_aux = autoencoder_loss.discriminator_loss(
            disc_params, disc_graphdef, images, x_rec, step, disc_start=options.get("disc_start", 0)
        )
        loss, aux["d_loss"] = loss + d_loss, d_aux["d_loss"]
    return loss, aux


@OBJECTIVES.register("distill")
def distill(
    config: ml_collections.ConfigDict, graphdef: nnx.GraphDef, schedule: RunProcess, example_shape: tuple[int, ...]
) -> Objective:
    """Progressive distillation (`distill.progressive`) of `distill.teacher_workdir` (its `sample.ema_decay`
    parameters): round r trains steps [r S, (r + 1) S) of S = `distill.steps_per_round` for a student of
    `distill.teacher_steps` / 2^(r+1) DDIM steps. At each round's first step the student so far becomes
    the teacher, the EMAs restart from it and the optimiser starts afresh, so its learning-rate schedule
    spans one round (the official code anneals it linearly to 0 within each round:
    google-research/diffusion_distillation, config/cifar_distill.py).

    The student is the teacher's network: `model.*` (less `dropout`), the schedule and
    `diffusion.prediction` must be the teacher's, and so must the example shape; a learned
    variance's channels are carried along untrained. Errors are one line naming the field, before anything compiles.
    """
    require_process(config, "discrete")
    d = config.distill
    teacher = load_teacher(config, schedule, example_shape)
    teacher_steps, steps_per_round = d.teacher_steps, d.steps_per_round
    progressive.check_rounds(teacher_steps, d.rounds, steps_per_round, schedule.num_timesteps,
                             config.training.num_steps)
    progressive.check_weighting(d.weighting)
    prediction, weighting = config.diffusion.prediction, d.weighting
    prediction_of = network_output_fn(bool(config.model.get("learn_sigma")), {})  # a learned variance's half dropped

    def loss(params: nnx.State, state: Any, inputs: LossInputs) -> tuple[jax.Array, dict[str, jax.Array]]:
        student_steps = progressive.student_steps(state.step, teacher_steps, steps_per_round)
        student_net = network(graphdef, params, inputs)
        student_fn = lambda x_t, t: prediction_of(student_net(x_t, t))  # noqa: E731
        teacher_fn = lambda x_t, t: prediction_of(model_apply(graphdef, state.teacher, x_t, t, inputs.cond))  # noqa: E731
        value, aux = progressive.distillation_loss(student_fn, teacher_fn, schedule, inputs.images, inputs.key,
                                                   student_steps, prediction=prediction, weighting=weighting)
        return value, aux | {"student_steps": student_steps.astype(jnp.float32)}

    def advance(state: Any, tx: optax.GradientTransformation) -> Any:
        def new_round(state: Any) -> Any:
            return state.replace(teacher=state.params, ema_params=tuple(state.params for _ in state.ema_params),
                                 opt_state=tx.init(state.params))

        starts = (state.step > 0) & (state.step % steps_per_round == 0)
        return jax.lax.cond(starts, new_round, lambda state: state, state)

    return Objective(loss, metrics=("student_steps",), shown=("loss", "student_steps", "grad_norm",
                                                              "images_per_sec"),
                     teacher=teacher, advance=advance, lr_horizon=steps_per_round, initial_params=teacher)


def load_teacher(config: ml_collections.ConfigDict, schedule: RunProcess, example_shape: tuple[int, ...]) -> nnx.State:
    """The parameters of `distill.teacher_workdir` (the EMA its config samples with), checked to be this run's
    network on this run's data and schedule."""
    field = "distill.teacher_workdir"
    workdir = config.distill.get("teacher_workdir")
    if workdir is None:
        raise ConfigError(f"{field}: None; training.objective='distill' needs the workdir of a trained diffusion run")
    teacher = load_diffusion_run(workdir, field, example_shape)
    trained = teacher.config
    check_same_network(teacher, workdir, field, config)  # the student is the teacher's network
    if trained.diffusion.prediction != config.diffusion.prediction:
        raise ConfigError(f"diffusion.prediction: the teacher {workdir} predicts {trained.diffusion.prediction!r}, "
                          f"this config {config.diffusion.prediction!r}")
    if not np.array_equal(np.asarray(teacher.schedule.alpha), np.asarray(schedule.alpha)):
        raise ConfigError(f"diffusion.schedule: the teacher {workdir} was trained on another noise schedule "
                          f"({trained.diffusion.schedule!r}, T={trained.diffusion.num_timesteps}); use its schedule")
    return teacher.params


def require_process(config: ml_collections.ConfigDict, process: str) -> None:
    """A one-line ConfigError unless `diffusion.process` is the one this objective trains on."""
    objective, has = config.training.get("objective", "denoise"), config.diffusion.get("process", "discrete")
    if has != process:
        hint = {"edm": " (or training.objective='edm' / 'consistency' for 'edm')",
                "flow": " (or training.objective='flow_matching' for 'flow')",
                "vdm": " (or training.objective='vdm' for 'vdm')"}.get(has, "")
        raise ConfigError(f"diffusion.process: {has!r}; training.objective={objective!r} trains on "
                          f"{process!r}{hint}")


@OBJECTIVES.register("edm")
def edm(
    config: ml_collections.ConfigDict, graphdef: nnx.GraphDef, schedule: RunProcess, example_shape: tuple[int, ...]
) -> Objective:
    """EDM's Eq. 8 (`edm_loss`) on the preconditioned network D(x; σ) of `diffusion.process='edm'`,
    σ lognormal with `diffusion.p_mean`, `diffusion.p_std`, weighted by λ(σ) with `diffusion.sigma_data`."""
    require_process(config, "edm")
    d = config.diffusion

    def loss(params: nnx.State, state: Any, inputs: LossInputs) -> tuple[jax.Array, dict[str, jax.Array]]:
        return edm_loss.edm_loss(network(graphdef, params, inputs), inputs.images, inputs.key, p_mean=d.p_mean,
                                 p_std=d.p_std, sigma_data=d.sigma_data)

    return Objective(loss)


@OBJECTIVES.register("flow_matching")
def flow_matching(
    config: ml_collections.ConfigDict, graphdef: nnx.GraphDef, schedule: RunProcess, example_shape: tuple[int, ...]
) -> Objective:
    """`flow.flow_matching_loss` on the velocity network of `diffusion.process='flow'`: t by `flow.t_sampling`,
    ε fresh, or with `flow.pairs_dir` the noise each reflow pair was drawn from (the batch's 'noise')."""
    require_process(config, "flow")
    f = config.flow
    flow.check_t_sampling(f.t_sampling)
    if f.get("pairs_dir") is not None:
        reflow.open_pairs(f.pairs_dir, example_shape)  # checked here, before compiling; the loop reads them
    initial_params = None
    if f.get("init_workdir") is not None:  # reflow's k-rectified flow starts from the (k-1)-rectified one
        start = load_diffusion_run(f.init_workdir, "flow.init_workdir", example_shape)
        check_same_network(start, f.init_workdir, "flow.init_workdir", config)
        initial_params = start.params

    def loss(params: nnx.State, state: Any, inputs: LossInputs) -> tuple[jax.Array, dict[str, jax.Array]]:
        return flow.flow_matching_loss(network(graphdef, params, inputs), inputs.images, inputs.key,
                                       noise=inputs.noise, t_sampling=f.t_sampling, logit_mean=f.logit_mean,
                                       logit_std=f.logit_std)

    return Objective(loss, initial_params=initial_params)


@OBJECTIVES.register("meanflow")
def meanflow_objective(
    config: ml_collections.ConfigDict, graphdef: nnx.GraphDef, schedule: RunProcess, example_shape: tuple[int, ...]
) -> Objective:
    """`meanflow.meanflow_loss` on the 'meanflow' network of `diffusion.process='flow'` (`models.Preconditioned`,
    called at (t, r)): (t, r) by `flow.t_sampling`, `flow.logit_mean`, `flow.logit_std` with r < t for a fraction
    `meanflow.interval_ratio`, the adaptive weight's `meanflow.adaptive_p`, `meanflow.adaptive_c`. Logs the
    unweighted squared error as 'mse'."""
    require_process(config, "flow")
    f, m = config.flow, config.meanflow
    flow.check_t_sampling(f.t_sampling)
    meanflow.check_options(m.interval_ratio, m.adaptive_p, m.adaptive_c)

    def loss(params: nnx.State, state: Any, inputs: LossInputs) -> tuple[jax.Array, dict[str, jax.Array]]:
        model_fn = network(graphdef, params, inputs)
        average_velocity = lambda z, t, r: model_fn(z, meanflow.model_time(t, r))  # noqa: E731
        value, aux = meanflow.meanflow_loss(average_velocity, inputs.images, inputs.key,
                                            interval_ratio=m.interval_ratio, t_sampling=f.t_sampling,
                                            logit_mean=f.logit_mean, logit_std=f.logit_std,
                                            adaptive_p=m.adaptive_p, adaptive_c=m.adaptive_c)
        return value, aux | {"mse": jnp.mean(aux["mse"])}

    return Objective(loss, metrics=("mse",), shown=("loss", "mse", "grad_norm", "images_per_sec"))


@OBJECTIVES.register("vdm")
def vdm_vlb(
    config: ml_collections.ConfigDict, graphdef: nnx.GraphDef, schedule: RunProcess, example_shape: tuple[int, ...]
) -> Objective:
    """`vdm.vdm_objective` of the `models.VDMNetwork` of `diffusion.process='vdm'`: the negative VLB in bits/dim
    (prior + `vdm.decoder`'s reconstruction + the continuous diffusion loss at antithetic t), whose gradient
    trains the network and γ's endpoints on the VLB and γ's shape on the VLB's variance. A VDM trains on this
    objective only: its schedule is learned, so a fixed schedule's L_simple has nothing to say about it."""
    require_process(config, "vdm")
    grid = None if config.vdm.decoder == "gaussian" else jnp.arange(256, dtype=jnp.float32) / 127.5 - 1.0

    def loss(params: nnx.State, state: Any, inputs: LossInputs) -> tuple[jax.Array, dict[str, jax.Array]]:
        model = nnx.merge(graphdef, params)
        rngs = nnx.Rngs(dropout=inputs.dropout_key)
        eps_fn = lambda z, gamma: model.eps(z, gamma, inputs.cond, train=True, rngs=rngs)  # noqa: E731
        value, aux = vdm.vdm_objective(eps_fn, model.gamma, inputs.images, inputs.key, grid)
        ends = model.gamma(jnp.asarray([0.0, 1.0], jnp.float32))
        return value, aux | {"gamma_0": ends[0], "gamma_1": ends[1]}

    return Objective(loss, metrics=("diffusion", "gamma_0", "gamma_1"),
                     shown=("loss", "gamma_0", "gamma_1", "grad_norm", "images_per_sec"))


def check_same_network(loaded: Any, workdir: str, field: str, config: ml_collections.ConfigDict) -> None:
    """`loaded` (the run in `workdir`, given by `field`) must be this run's network: `model.*` less dropout,
    `diffusion.process`."""
    trained = loaded.config
    changes = network_changes(trained, config)
    if changes:
        key, (had, has) = next(iter(changes.items()))
        raise ConfigError(f"model.{key}: this run continues {field} {workdir}'s network, which has {had!r}; this "
                          f"config {has!r}")
    process = trained.diffusion.get("process", "discrete")
    if process != config.diffusion.get("process", "discrete"):
        raise ConfigError(f"diffusion.process: {field} {workdir} trained on {process!r}, this config on "
                          f"{config.diffusion.get('process', 'discrete')!r}")


def network_changes(trained: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> run_config.Changes:
    """How `config.model` differs from a trained run's, less `dropout` (a training regulariser, not part of the
    function: PD's students use 0) and `pretrained`."""
    changes = run_config.diff(run_config.as_json(trained.model), run_config.as_json(config.model))
    changes.pop("dropout", None)
    changes.pop("pretrained", None)  # where the weights came from, not what the network computes
    return changes


@OBJECTIVES.register("consistency")
def consistency_objective(
    config: ml_collections.ConfigDict, graphdef: nnx.GraphDef, schedule: RunProcess, example_shape: tuple[int, ...]
) -> Objective:
    """Consistency distillation (`consistency.teacher_workdir`: one Heun step of the teacher's probability-flow
    ODE per level, Algorithm 2) or training (none: Algorithm 3, and iCT with `curriculum='ict'`,
    `level_sampling='lognormal'`, `weighting='inverse_gap'`, `distance='pseudo_huber'`,
    `target_ema_decay=None`) of the network f(x, σ) of `diffusion.preconditioning='consistency'`
    (`distill.consistency.consistency_loss`).

    The target network θ⁻ is the EMA of `consistency.target_ema_decay` (one of `training.ema_decays`, so
    checkpointed and resumed with the run), or θ under stop_gradient; it sees the student's dropout mask.
    The teacher is any diffusion run on this data (a discrete-schedule run is read in the VE scale,
    `consistency.ve_denoiser`); the student starts as it when it is an 'edm' run of this `model`.
    """
    from diffusion_jax.loading import ema_index  # loading builds on training.setup, as this module does

    require_process(config, "edm")
    d, c = config.diffusion, config.consistency
    if d.preconditioning != "consistency":
        raise ConfigError(f"diffusion.preconditioning: {d.preconditioning!r}; training.objective='consistency' "
                          "needs 'consistency', whose f(x, σ_min) = x exactly")
    consistency.check_options(c)
    grid = consistency.Grid(d.sigma_min, d.sigma_max, d.sigma_data, c.rho)
    target_index = ema_index(config, c.target_ema_decay, "consistency.target_ema_decay")
    ict = c.curriculum == "ict"
    total_steps, max_levels = config.training.num_steps, (c.s1 + 1 if ict else c.num_levels)
    teacher, teacher_fn, initial_params = None, None, None
    if c.teacher_workdir is not None:
        field = "consistency.teacher_workdir"
        loaded = load_diffusion_run(c.teacher_workdir, field, example_shape)
        teacher, trained = loaded.params, loaded.config
        if trained.diffusion.get("process", "discrete") == "edm" and not network_changes(trained, config):
            initial_params = teacher  # the student starts as the teacher's network
        prediction_of = network_output_fn(bool(trained.model.get("learn_sigma")), {})

        def teacher_fn(teacher_params: nnx.State, cond: conditioning.Cond) -> diffusion.ModelFn:
            apply = lambda x, t: prediction_of(model_apply(loaded.graphdef, teacher_params, x, t, cond))  # noqa: E731
            return consistency.ve_denoiser(apply, loaded.schedule, trained.diffusion.prediction)

    def loss(params: nnx.State, state: Any, inputs: LossInputs) -> tuple[jax.Array, dict[str, jax.Array]]:
        num_levels = consistency.ict_num_levels(state.step, total_steps, c.s0, c.s1) if ict else c.num_levels
        target_params = (jax.lax.stop_gradient(params) if target_index is None
                         else state.ema_params[target_index])
        value, aux = consistency.consistency_loss(
            network(graphdef, params, inputs), network(graphdef, target_params, inputs), inputs.images, inputs.key,
            num_levels, teacher_denoise=None if teacher_fn is None else teacher_fn(state.teacher, inputs.cond),
            grid=grid, distance_kind=c.distance, level_sampling=c.level_sampling, max_levels=max_levels,
            weighting=c.weighting, p_mean=c.p_mean, p_std=c.p_std)
        return value, aux | {"num_levels": jnp.asarray(num_levels, jnp.float32)}

    return Objective(loss, metrics=("num_levels",), shown=("loss", "num_levels", "grad_norm", "images_per_sec"),
                     teacher=teacher, initial_params=initial_params)


DIFFUSION_OBJECTIVES = ("denoise", "edm", "flow_matching", "vdm")  # runs whose model is a denoiser or a velocity


def load_diffusion_run(workdir: str, field: str, example_shape: tuple[int, ...]) -> Any:
    """`dj.load` of a teacher or starting point (`field` gave `workdir`), checked to be a diffusion model of this
    run's examples (one-line ConfigErrors)."""
    from diffusion_jax.loading import load  # loading builds on training.setup, as this module does

    loaded = load(workdir, field=field)
    objective = loaded.config.training.get("objective", "denoise")
    if objective not in DIFFUSION_OBJECTIVES:
        raise ConfigError(f"{field}: {workdir} is a training.objective={objective!r} run, not a diffusion model")
    if tuple(loaded.example_shape) != tuple(example_shape):
        raise ConfigError(f"data.image_size: {field} {workdir} models {tuple(loaded.example_shape)} examples; "
                          f"this run's are {tuple(example_shape)}")
    return loaded
