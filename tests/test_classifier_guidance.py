"""Classifier guidance (Dhariwal & Nichol 2021) with the exact classifier of a Gaussian mixture,
the noise-aware classifier network, its training objective, and guided sampling from a config."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import tiny_digits_config
from flax import nnx

import diffusion_jax as dj
from diffusion_jax import classifier_loss, diffusion, exact, guidance, models
from diffusion_jax.errors import ConfigError
from diffusion_jax.training import experiment
from diffusion_jax.training.checkpoint import Checkpointer
from diffusion_jax.training.loop import train
from diffusion_jax.training.sampling import make_sample_fn
from diffusion_jax.validation import validate_config

N = 8_000
TARGET = 0
# Two overlapping classes with unequal priors: the unconditional mean (0.2, -0.08) is far from
# the target component's (-0.5, 0.2), and p(class | x) is not saturated, so guidance has room to act.
MIXTURE = exact.GaussianMixture(np.array([[-0.5, 0.2], [0.5, -0.2]]), 0.4, np.array([0.3, 0.7]))
TARGET_COV = MIXTURE.std**2 * np.eye(2)


@pytest.fixture(scope="module")
def sched():
    return dj.schedules.linear(1000)


@pytest.fixture(scope="module")
def x_T():
    return jax.random.normal(jax.random.key(1), (N, 2))


def grad_fn(sched, scale, labels=None):
    labels = jnp.full((N,), TARGET, jnp.int32) if labels is None else labels
    return guidance.classifier_grad(exact.class_log_prob(MIXTURE, sched), labels, scale)


@pytest.fixture(scope="module")
def ddim_guided(sched, x_T):
    """Algorithm 2 with DDIM (eta = 0, 200 steps), jitted once, as a function of the scale."""
    model = exact.x0_model(MIXTURE, sched)
    labels = jnp.full((N,), TARGET, jnp.int32)

    @jax.jit
    def run(scale):
        guided = guidance.classifier_guided(
            model, guidance.classifier_grad(exact.class_log_prob(MIXTURE, sched), labels, scale), sched, "x0"
        )
        return dj.samplers.get("ddim")(guided, sched, jax.random.key(2), x_T, steps=200, prediction="x0")

    return lambda scale: np.asarray(run(jnp.float32(scale)))


def assert_target_component(x):
    np.testing.assert_allclose(x.mean(0), MIXTURE.means[TARGET], atol=0.03)
    np.testing.assert_allclose(np.cov(x.T), TARGET_COV, atol=0.02)


def rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


# --- the exact classifier and the gradient ------------------------------------------------------


def test_class_log_prob_is_bayes_rule(sched):
    """log p(k | x_t) against pi_k N(x_t; alpha mu_k, (alpha^2 s^2 + sigma^2) I) normalised in float64."""
    x = np.random.default_rng(0).standard_normal((6, 2)) * 1.5
    t = np.array([0, 10, 100, 400, 700, 999])
    got = np.asarray(exact.class_log_prob(MIXTURE, sched)(jnp.asarray(x, jnp.float32), jnp.asarray(t)))
    alpha, sigma = np.asarray(sched.alpha, np.float64)[t, None], np.asarray(sched.sigma, np.float64)[t, None]
    var = alpha**2 * MIXTURE.std**2 + sigma**2  # [B, 1]
    log_joint = np.stack(
        [
            np.log(w) - np.sum((x - alpha * mu) ** 2, axis=1) / (2 * var[:, 0]) - np.log(2 * np.pi * var[:, 0])
            for mu, w in zip(MIXTURE.means, MIXTURE.weights, strict=True)
        ],
        axis=1,
    )
    want = log_joint - np.log(np.exp(log_joint).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(got, want, atol=1e-5)
    # At t = 0 the noise is tiny: the posterior at x_0.
    np.testing.assert_allclose(np.exp(got[:1]), exact.class_posterior(MIXTURE, x[:1]), atol=1e-3)


def test_classifier_grad_is_the_closed_form_per_example_gradient(sched):
    """grad_x log p(y | x_t) = alpha / var (mu_y - sum_k p(k | x_t) mu_k), times the scale."""
    x = jnp.asarray(np.random.default_rng(1).standard_normal((5, 2)), jnp.float32)
    t = jnp.array([3, 50, 250, 600, 990])
    labels = jnp.array([0, 1, 0, 1, 0])
    got = guidance.classifier_grad(exact.class_log_prob(MIXTURE, sched), labels, 2.5)(x, t)
    alpha, sigma = sched.alpha_sigma(t)
    var = alpha**2 * MIXTURE.std**2 + sigma**2
    p = jnp.exp(exact.class_log_prob(MIXTURE, sched)(x, t))  # [B, K]
    means = jnp.asarray(MIXTURE.means, jnp.float32)
    want = 2.5 * (alpha / var)[:, None] * (means[labels] - p @ means)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_label_log_prob_normalises_logits():
    logits = jnp.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    got = guidance.label_log_prob(logits + 7.0, jnp.array([2, 1]))  # shift-invariant
    np.testing.assert_allclose(got, [3.0 - np.log(np.exp([1, 2, 3]).sum()), -np.log(3.0)], rtol=1e-6)


# --- Algorithm 2: the guided denoiser ------------------------------------------------------------


def as_prediction(x0_fn, prediction, sched):
    """A model of kind `prediction` from an exact x0 model (and the schedule's alpha, sigma)."""

    def model(x_t, t):
        x0 = x0_fn(x_t, t)
        alpha, sigma = sched.alpha[t][:, None], sched.sigma[t][:, None]
        eps = diffusion.eps_from_x0(x_t, x0, alpha, sigma)
        if prediction == "score":
            return diffusion.score_from_eps(eps, sigma)
        return diffusion.training_target(x0, eps, alpha, sigma, prediction)

    return model


@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "score"])
def test_guided_denoiser_at_scale_one_is_the_class_conditional_denoiser(sched, prediction):
    """eps - sigma grad log p(y | x_t) = -sigma grad log p(x_t | y): the exact conditional model."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((64, 2)), jnp.float32)
    t = jnp.asarray(rng.integers(0, 1000, 64))
    labels = jnp.asarray(rng.integers(0, 2, 64))
    unconditional = as_prediction(exact.x0_model(MIXTURE, sched), prediction, sched)
    cond_x0 = exact.conditional_x0_model(MIXTURE, sched)
    conditional = as_prediction(lambda x_t, t_: cond_x0(x_t, t_, labels), prediction, sched)

    def guided(scale):
        grad = guidance.classifier_grad(exact.class_log_prob(MIXTURE, sched), labels, scale)
        return guidance.classifier_guided(unconditional, grad, sched, prediction)(x, t)

    assert rel(guided(1.0), conditional(x, t)) < 1e-4
    assert rel(guided(0.0), unconditional(x, t)) < 1e-4  # float32 round trip through eps
    assert rel(guided(0.0), conditional(x, t)) > 0.05  # the comparison can fail


def test_guided_denoiser_rejects_an_unknown_prediction(sched):
    with pytest.raises(ConfigError, match="diffusion.prediction: unknown prediction 'epsilon'"):
        guidance.classifier_guided(exact.x0_model(MIXTURE, sched), grad_fn(sched, 1.0), sched, "epsilon")


# --- sampling the exact class-conditional distribution -------------------------------------------


def test_ddim_algorithm2_at_scale_one_samples_the_class_conditional(ddim_guided):
    assert_target_component(ddim_guided(1.0))


def test_ddim_at_scale_zero_does_not_sample_the_class_conditional(ddim_guided):
    x = ddim_guided(0.0)
    with pytest.raises(AssertionError):
        assert_target_component(x)
    np.testing.assert_allclose(x.mean(0), MIXTURE.weights @ MIXTURE.means, atol=0.03)  # the whole mixture


def test_larger_scales_raise_the_target_class_posterior(ddim_guided):
    p = [exact.class_posterior(MIXTURE, ddim_guided(s))[:, TARGET].mean() for s in (0.0, 1.0, 3.0, 10.0)]
    assert p[0] < p[1] < p[2] < p[3], p
    assert p[3] > p[1] + 0.1, p


def test_ddpm_algorithm1_at_scale_one_samples_the_class_conditional(sched, x_T):
    """The full 1000-step ancestral chain with the mean shift mu + Sigma * cond_fn (Algorithm 1)."""
    sampler = jax.jit(
        lambda scale: dj.samplers.get("ddpm")(
            exact.x0_model(MIXTURE, sched), sched, jax.random.key(3), x_T, prediction="x0",
            cond_fn=grad_fn(sched, scale),
        )
    )
    assert_target_component(np.asarray(sampler(1.0)))
    with pytest.raises(AssertionError):
        assert_target_component(np.asarray(sampler(0.0)))


# --- the noise-aware classifier network ----------------------------------------------------------

CLASSIFIER_KW = dict(
    image_size=8, in_channels=1, num_classes=10, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
    num_head_channels=None, use_scale_shift_norm=True, resblock_updown=True,
)


def random_classifier(seed):
    """The classifier with every parameter from N(0, 0.2^2) (so the zero-initialised head does not
    hide the body), built abstractly and filled from NumPy, which compiles no initialisers."""
    model = nnx.eval_shape(lambda: models.create("classifier", rngs=nnx.Rngs(0), **CLASSIFIER_KW))
    rng = np.random.default_rng(seed)
    state = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda s: jnp.asarray(0.2 * rng.standard_normal(s.shape), s.dtype), state))
    return model


def test_classifier_is_the_unet_encoder_with_a_pooled_head():
    classifier = nnx.eval_shape(lambda: models.create("classifier", rngs=nnx.Rngs(0), **CLASSIFIER_KW))
    unet_kw = {k: v for k, v in CLASSIFIER_KW.items() if k != "num_classes"}
    unet = nnx.eval_shape(lambda: models.create("unet", rngs=nnx.Rngs(0), **unet_kw))

    def shapes(model):
        leaves = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
        return {jax.tree_util.keystr(path): leaf.shape for path, leaf in leaves}

    ours, theirs = shapes(classifier), shapes(unet)
    head = {k for k in ours if k.startswith(("['head']", "['norm_out']"))}
    assert head and {k: ours[k] for k in set(ours) - head} == {
        k: s for k, s in theirs.items() if not k.startswith(("['up']", "['norm_out']", "['conv_out']"))
    }
    assert ours["['head']['kernel'].value"] == (16, 10)  # ch * ch_mult[-1] pooled features -> 10 logits


def test_classifier_logits_per_example_and_time_dependent():
    model = random_classifier(seed=1)
    graphdef, params = nnx.split(model)
    apply = jax.jit(lambda x, t: nnx.merge(graphdef, params)(x, t))
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
    t = jnp.array([0, 10, 50, 99])
    logits = apply(x, t)
    assert logits.shape == (4, 10) and logits.dtype == jnp.float32
    # Batch-independent: each example's logits depend on that example only.
    np.testing.assert_allclose(apply(x.at[1:].set(0.0), t)[0], logits[0], rtol=1e-5, atol=1e-5)
    # The time embedding is used. Its effect is small here: at 16 channels the head's GroupNorm has one
    # channel per group, so the pooled features keep only the shape of each channel's activations.
    assert np.abs(apply(x, t + 500) - logits).max() > 1e-5
    with pytest.raises(ValueError, match="cond: the noise-aware classifier"):
        model(x, t, jnp.zeros(4, jnp.int32))
    with pytest.raises(ValueError, match=r"x: EncoderUNet expects \[B, 8, 8, 1\]"):
        model(jnp.zeros((1, 16, 16, 1)), t[:1])


def test_noisy_classifier_loss_is_the_cross_entropy_at_noised_inputs(sched):
    x0 = jnp.asarray(MIXTURE.sample(np.random.default_rng(4), 256))
    labels = jnp.asarray(np.random.default_rng(4).integers(0, 2, 256))
    seen = {}

    def logits_fn(x_t, t):
        seen.update(x_t=x_t, t=t)
        return exact.class_log_prob(MIXTURE, sched)(x_t, t)

    loss, aux = classifier_loss.noisy_classifier_loss(logits_fn, sched, x0, labels, jax.random.key(5))
    x_t, t = seen["x_t"], seen["t"]
    assert t.shape == (256,) and int(t.min()) >= 0 and int(t.max()) < 1000 and len(np.unique(t)) > 100
    eps = (x_t - sched.alpha[t][:, None] * x0) / sched.sigma[t][:, None]  # the noise q_sample added
    assert abs(float(eps.mean())) < 0.1 and abs(float(eps.std()) - 1.0) < 0.1
    log_p = exact.class_log_prob(MIXTURE, sched)(x_t, t)
    np.testing.assert_allclose(loss, -jnp.mean(log_p[jnp.arange(256), labels]), rtol=1e-5)
    np.testing.assert_allclose(aux["accuracy"], jnp.mean(jnp.argmax(log_p, -1) == labels), rtol=1e-6)


# --- training a classifier from a config and guiding a diffusion model with it -------------------


def tiny_classifier_config(data_dir):
    config = tiny_digits_config(data_dir)
    kw = {k: v for k, v in CLASSIFIER_KW.items() if k not in ("image_size", "in_channels")}
    config.model = ml_collections.ConfigDict(dict(name="classifier", dropout=0.0, num_heads=1, **kw))
    config.training.objective = "classify"
    config.optim.learning_rate = 1e-2  # a visible gradient after 4 steps
    return config


@pytest.fixture(scope="module")
def classifier_workdir(tmp_path_factory, digits_data_dir):
    """A tiny classifier trained for 4 steps with `training.loop.train`."""
    workdir = tmp_path_factory.mktemp("classifier")
    train(tiny_classifier_config(digits_data_dir), workdir)
    return workdir


def test_classify_run_writes_checkpoints_and_accuracy_but_no_samples(classifier_workdir):
    assert json.loads((classifier_workdir / "config.json").read_text())["training"]["objective"] == "classify"
    assert (classifier_workdir / "checkpoints" / "4").is_dir()
    logged = [json.loads(line) for line in (classifier_workdir / "metrics.jsonl").read_text().splitlines()]
    assert logged and all(0.0 <= m["accuracy"] <= 1.0 and np.isfinite(m["loss"]) for m in logged)
    assert not (classifier_workdir / "samples").exists()


def test_sample_mode_on_a_classifier_run_is_a_config_error(classifier_workdir, digits_data_dir):
    from diffusion_jax.sample import sample

    with pytest.raises(ConfigError, match="training.objective: a 'classify' run trains a noise-aware classifier"):
        sample(tiny_classifier_config(digits_data_dir), classifier_workdir)


@pytest.fixture(scope="module")
def diffusion_run(digits_data_dir):
    """An untrained tiny digits model, built once; its params shifted into a non-trivial denoiser."""
    exp = experiment.build(tiny_digits_config(digits_data_dir))
    return exp, jax.tree.map(lambda p: p + 0.05, exp.init_state().params)


def sample_fn(diffusion_run, digits_data_dir, **sample_fields):
    exp, _ = diffusion_run
    config = tiny_digits_config(digits_data_dir)
    config.sample.update(sample_fields)
    return make_sample_fn(exp.graphdef, exp.schedule, config, exp.example_shape, exp.batch_sharding)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_guided_sampling_with_a_trained_classifier(
    classifier_workdir, digits_data_dir, diffusion_run, sampler, monkeypatch
):
    """Algorithm 2 (the guided denoiser) under DDIM, Algorithm 1 (cond_fn) under DDPM."""
    transforms = []
    classifier_guided = guidance.classifier_guided
    monkeypatch.setattr(guidance, "classifier_guided", lambda *a: transforms.append(a) or classifier_guided(*a))

    def samples(scale, workdir=str(classifier_workdir)):
        # clip_x0=None: clipping to [-1, 1] would hide part of the guidance
        fn = sample_fn(
            diffusion_run, digits_data_dir, sampler=sampler, clip_x0=None, classifier_workdir=workdir,
            classifier_scale=scale,
        )
        return np.asarray(fn(diffusion_run[1], jax.random.key(0))[0])

    plain, unguided, guided = samples(1.0, workdir=None), samples(0.0), samples(300.0)
    assert guided.shape == (8, 8, 8, 1) and np.isfinite(guided).all()
    np.testing.assert_allclose(unguided, plain, atol=1e-5)  # scale 0 is the unguided sampler
    assert np.abs(guided - plain).max() > 1e-3  # the classifier's gradient moves the samples
    assert len(transforms) == (2 if sampler == "ddim" else 0)  # Algorithm 2 only off 'ddpm'


def test_bad_classifier_workdirs_are_one_line_config_errors(
    classifier_workdir, digits_data_dir, diffusion_run, tmp_path
):
    with pytest.raises(ConfigError, match="sample.classifier_workdir: .* has no checkpoints/ directory"):
        sample_fn(diffusion_run, digits_data_dir, classifier_workdir=str(tmp_path / "missing"))
    diffusion_workdir = tmp_path / "diffusion_run"
    checkpointer = Checkpointer(diffusion_workdir / "checkpoints")  # a diffusion run's checkpoint, with its config
    checkpointer.save(1, diffusion_run[0].init_state(), tiny_digits_config(digits_data_dir))
    checkpointer.close()
    with pytest.raises(ConfigError, match="sample.classifier_workdir: .* is not a classifier run"):
        sample_fn(diffusion_run, digits_data_dir, classifier_workdir=str(diffusion_workdir))
    config = tiny_digits_config(digits_data_dir)
    config.diffusion.num_timesteps = 200
    config.sample.classifier_workdir = str(classifier_workdir)
    with pytest.raises(ConfigError, match="sample.classifier_workdir: .* the same noise levels"):
        experiment.build(config)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("training.objective", "score",
         "training.objective: unknown objective 'score'; choose one of: autoencode, classify, consistency, denoise, "
         "distill, edm, flow_matching"),
        ("model.name", "unet", "training.objective: 'classify' trains a noise-aware classifier; set model.name"),
        ("training.objective", "denoise", "model.name: 'classifier' outputs class logits"),
        ("model.num_classes", None, "model.num_classes: got None; training.objective='classify' needs an int >= 2"),
        ("sample.classifier_scale", -1.0, "sample.classifier_scale: got -1.0; expected a float >= 0"),
    ],
)
def test_bad_objective_fields_fail_validation(digits_data_dir, field, value, message):
    config = tiny_classifier_config(digits_data_dir)
    section, name = field.split(".")
    config[section][name] = value
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_config(config, num_devices=8, num_processes=1)
