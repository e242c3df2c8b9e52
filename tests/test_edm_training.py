"""EDM training (Karras et al. 2022): the preconditioned model wrapper, the loss's minimiser on an exact
Gaussian mixture, the process contract's one-line errors, and a short run that samples."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_build_errors, changed, load_config, tiny_digits_config
from flax import nnx

import diffusion_jax as dj
from diffusion_jax import data, edm_loss, exact, models, sde
from diffusion_jax.errors import ConfigError
from diffusion_jax.training import experiment
from diffusion_jax.training.loop import train
from diffusion_jax.training.setup import build_model, model_apply


def edm_config(data_dir: str, preconditioning: str = "edm"):
    config = tiny_digits_config(data_dir)
    config.training.objective = "edm" if preconditioning == "edm" else "consistency"
    config.diffusion.update(process="edm", preconditioning=preconditioning, prediction="x0")
    config.sample.update(sampler="heun", steps=3, clip_x0=None)
    config.eval.metrics = ("digits",)  # not the discrete schedule's vlb_bpd
    return config


def test_the_loss_is_minimised_by_the_exact_denoiser():
    mixture = exact.ring(4, std=0.1)
    exact_d = exact.x0_model(mixture, sde.EDM())  # E[x_0 | x_σ]
    x0 = jnp.asarray(mixture.sample(np.random.default_rng(0), 16384), jnp.float32)
    key = jax.random.key(1)  # the same σ and noise for every model: the losses differ only by the model

    def loss(scale: jax.Array, shift: jax.Array) -> jax.Array:
        perturbed = lambda x, sigma: exact_d(x, sigma) * (1.0 + scale) + shift  # noqa: E731
        return edm_loss.edm_loss(perturbed, x0, key)[0]

    at_exact = loss(0.0, jnp.zeros(2))
    for scale, shift in [(0.05, (0.0, 0.0)), (-0.05, (0.0, 0.0)), (0.0, (0.02, 0.0)), (0.0, (0.0, -0.02))]:
        assert loss(scale, jnp.asarray(shift)) > at_exact
    grad_scale, grad_shift = jax.grad(loss, argnums=(0, 1))(0.0, jnp.zeros(2))
    curvature = jax.grad(jax.grad(lambda a: loss(a, jnp.zeros(2))))(0.0)  # 2 E[λ |D|²]
    assert abs(float(grad_scale)) < 0.02 * float(curvature)
    shift_curvature = jax.grad(jax.grad(lambda b: loss(0.0, jnp.stack([b, 0.0]))))(0.0)  # 2 E[λ]
    assert float(jnp.max(jnp.abs(grad_shift))) < 0.02 * float(shift_curvature)
    sigmas = edm_loss.lognormal_sigmas(jax.random.key(2), 100_000)
    np.testing.assert_allclose([np.mean(np.log(sigmas)), np.std(np.log(sigmas))], [-1.2, 1.2], atol=0.02)
    np.testing.assert_allclose(edm_loss.loss_weight(jnp.asarray(0.5)), 8.0)  # (0.25 + 0.25) / 0.0625


def test_the_wrapper_is_the_preconditioned_backbone_and_consistency_has_its_boundary():
    backbone = models.create("mlp", rngs=nnx.Rngs(0), in_features=3, hidden=16, depth=2)
    x = jax.random.normal(jax.random.key(0), (4, 3))
    sigma = jnp.asarray([0.002, 0.1, 1.0, 40.0])
    d = models.Preconditioned(backbone, "edm", sigma_data=0.5)(x, sigma)
    norm = jnp.sqrt(sigma**2 + 0.25)[:, None]
    by_hand = 0.25 / norm**2 * x + (0.5 * sigma[:, None] / norm) * backbone(x / norm, 250.0 * jnp.log(sigma))
    np.testing.assert_allclose(d, by_hand, rtol=1e-5, atol=1e-6)
    f = models.Preconditioned(backbone, "consistency", sigma_data=0.5, sigma_min=0.002)
    assert np.array_equal(f(x, jnp.full((4,), 0.002)), x)  # f(x, σ_min) = x exactly
    assert not np.allclose(f(x, sigma)[1:], x[1:])
    with pytest.raises(ConfigError, match="^diffusion.preconditioning: unknown 'vp'; choose one of: edm, consistency"):
        models.Preconditioned(backbone, "vp")


def test_process_mismatches_are_one_line_errors(digits_data_dir):
    edm = lambda fields: changed(edm_config(digits_data_dir), fields)  # noqa: E731
    assert_build_errors([
        (edm({"diffusion.prediction": "eps"}),
         r"^diffusion.prediction: 'eps'; diffusion.process='edm' wraps .* set 'x0'"),
        (edm({"diffusion.process": "sde"}),
         r"^diffusion.process: unknown 'sde'; choose one of: discrete, edm, flow, vdm"),
        (edm({"diffusion.sigma_min": 0.0}),
         r"^diffusion.sigma_min, diffusion.sigma_max: got 0.0, 80.0; need 0 < sigma_min"),
        (edm({"model.learn_sigma": True}),
         r"^model.learn_sigma: True; diffusion.process='edm' wraps .* not a learned-variance"),
        (edm({"training.objective": "denoise"}),
         r"^diffusion.process: 'edm'; training.objective='denoise' trains on 'discrete' \(or training.objective='edm'"),
        (changed(tiny_digits_config(digits_data_dir), {"training.objective": "edm"}),
         r"^diffusion.process: 'discrete'; training.objective='edm' trains on 'edm'"),
        (edm({"eval.metrics": ("vlb_bpd",)}), r"^eval.metrics: 'vlb_bpd' sums the T terms of a discrete schedule"),
    ])


def test_an_edm_run_trains_loads_and_samples_on_its_process(digits_data_dir, tmp_path):
    config = edm_config(digits_data_dir)
    config.training.update(num_steps=2, checkpoint_every=2, sample_every=2)
    state = train(config, tmp_path)
    assert (tmp_path / "samples" / "samples_2.png").exists()
    model = dj.load(tmp_path)
    assert isinstance(model.schedule, sde.EDM) and model.schedule.sigma_max == 80.0
    graphdef, _ = build_model(config, (8, 8, 1))
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
    sigma = jnp.asarray([0.5, 5.0])
    backbone = nnx.merge(graphdef, model.params).backbone  # the checkpoint holds the backbone's parameters
    norm = jnp.sqrt(sigma**2 + 0.25)[:, None, None, None]
    by_hand = 0.25 / norm**2 * x + 0.5 * sigma[:, None, None, None] / norm * backbone(x / norm, 250.0 * jnp.log(sigma))
    np.testing.assert_allclose(model.apply(x, sigma), by_hand, rtol=1e-4, atol=1e-5)
    assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, model.params, state.params)))  # the EMA, loaded


def test_samples_start_from_the_process_prior(digits_data_dir):
    # With F = 0 the wrapper is D(x; σ) = σ_d² / (σ² + σ_d²) x, the exact denoiser of N(0, σ_d² I) data:
    # sampled from N(0, σ_max² I), its samples have std σ_d = 0.5 (from N(0, I) they would have 0.5 / 80).
    config = edm_config(digits_data_dir)
    config.sample.update(steps=18, batch_size=64)
    exp = experiment.build(config)
    zeros = jax.tree.map(jnp.zeros_like, exp.init_state().params)
    x0, nfe = exp.sample_fn(zeros, jax.random.key(0))
    assert int(nfe) == 35
    np.testing.assert_allclose(np.std(np.asarray(x0)), 0.5, rtol=0.1)  # Heun-18's error on this Gaussian: 6%


@pytest.mark.parametrize("name", ["dit_digits", "ddpm_swissroll"])
def test_every_backbone_takes_the_preconditioning(name):
    config = load_config(name)  # a class-conditional DiT on images, an MLP on 2-D points
    config.diffusion.update(process="edm", preconditioning="consistency", prediction="x0")
    config.model.learn_sigma = False
    shape = data.example_shape(config.data)
    graphdef, init = build_model(config, shape)
    labels = jnp.zeros((2,), jnp.int32) if config.model.get("num_classes") else None
    out = jax.eval_shape(lambda p, x: model_apply(graphdef, p, x, jnp.ones((2,)), labels),
                         jax.eval_shape(init, jax.random.key(0)), jax.ShapeDtypeStruct((2, *shape), jnp.float32))
    assert out.shape == (2, *shape)


def test_a_checkpoint_written_before_the_process_field_resumes_as_discrete():
    from diffusion_jax.config import base_config
    from diffusion_jax.training import run_config

    current = run_config.as_json(base_config())
    saved = run_config.as_json(base_config())
    for section, field in [("diffusion", "process"), ("diffusion", "sigma_data"), ("consistency", None),
                           ("flow", None)]:
        saved[section].pop(field) if field else saved.pop(section)  # a wave-1 checkpoint's config
    assert run_config.diff(saved, current)  # the new fields alone would refuse the resume
    assert run_config.diff(run_config.with_defaults(saved), current) == {}
    saved["model"] = {"name": "mlp", "hidden": 64}
    assert run_config.with_defaults(saved)["model"] == {"name": "mlp", "hidden": 64}  # no U-Net fields added
