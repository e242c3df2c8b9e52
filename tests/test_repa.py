"""REPA (Yu et al. 2024): the alignment loss, the backbones' taps, and a run trained with it."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_build_errors, changed, tiny_digits_config
from flax import nnx
from test_dinov2 import hf_patch_tokens, save_tiny_dinov2

import diffusion_jax as dj
from diffusion_jax import models, repa
from diffusion_jax.errors import ConfigError
from diffusion_jax.metrics import digits
from diffusion_jax.training import experiment
from diffusion_jax.training.loop import train


def test_the_alignment_is_minus_the_mean_cosine_on_the_encoders_grid():
    target = jax.random.normal(jax.random.key(0), (2, 4, 4, 8))
    assert float(repa.alignment_loss(3.0 * target, target)) == pytest.approx(-1.0, abs=1e-6)  # scale-free
    assert float(repa.alignment_loss(-target, target)) == pytest.approx(1.0, abs=1e-6)
    tokens = jnp.arange(2 * 8 * 8 * 3, dtype=jnp.float32).reshape(2, 8, 8, 3)
    pooled = repa.pool_to_grid(tokens, (4, 4))
    np.testing.assert_allclose(pooled[1, 2, 3], tokens[1, 4:6, 6:8].mean(axis=(0, 1)))
    with pytest.raises(ConfigError, match=r"^repa.layer: its tokens lie on a 8x8 grid, which does not pool onto"):
        repa.pool_to_grid(tokens, (3, 3))


@pytest.mark.parametrize("name,kwargs,layer,shape", [
    ("unet", dict(image_size=8, in_channels=1, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=()), 3,
     (2, 4, 4, 5)),
    ("dit", dict(image_size=8, in_channels=1, patch_size=2, hidden_size=16, depth=2, num_heads=2), 1, (2, 4, 4, 5)),
])
def test_a_tapped_backbone_sows_its_projection_only_while_training(name, kwargs, layer, shape):
    make = lambda: models.create(name, repa_layer=layer, repa_dim=5, rngs=nnx.Rngs(0), **kwargs)  # noqa: E731
    graphdef, _ = nnx.split(nnx.eval_shape(make))
    params = jax.jit(lambda: nnx.split(make())[1])()

    @jax.jit
    def sown(params: nnx.State) -> tuple[list, list]:
        leaves = []
        for is_training in (False, True):
            model = nnx.merge(graphdef, params)
            model(jnp.zeros((2, 8, 8, 1)), jnp.ones((2,)), None, train=is_training, rngs=nnx.Rngs(dropout=0))
            leaves.append(jax.tree.leaves(nnx.pop(model, nnx.Intermediate)))
        return leaves

    evaluating, training = sown(params)
    assert not evaluating and [leaf.shape for leaf in training] == [shape]
    with pytest.raises(ConfigError, match=r"^repa.layer: 9; this backbone's taps are 1\.\."):
        nnx.eval_shape(lambda: models.create(name, repa_layer=9, repa_dim=5, rngs=nnx.Rngs(0), **kwargs))


def test_digits_encoder_features_are_the_classifiers_last_conv_map():
    encoder = repa.encoder("digits")
    x0 = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (3, 16, 16, 1)), jnp.float32)
    features = encoder(x0)
    assert features.shape == (3, 4, 4, encoder.width) and encoder.width == repa.encoder_width("digits")
    evaluator = digits.default_evaluator()
    native = jnp.asarray(digits.to_native(np.asarray(x0)))
    np.testing.assert_allclose(features, evaluator.classifier().spatial_features(native), atol=1e-5)


def test_a_repa_run_aligns_its_tap_and_loads(digits_data_dir, tmp_path):
    config = tiny_digits_config(digits_data_dir)
    config.repa.update(weight=0.5, layer=3)  # the middle block, 4x4: the encoder's grid
    config.training.update(num_steps=6, log_every=1, checkpoint_every=6, sample_every=0)
    train(config, tmp_path / "repa")
    logged = [json.loads(line) for line in (tmp_path / "repa" / "metrics.jsonl").read_text().splitlines()]
    alignment = [row["repa"] for row in logged if "repa" in row]
    assert len(alignment) == 6 and alignment[-1] < alignment[0] - 0.1  # the projector learns to align
    loaded = dj.load(tmp_path / "repa")
    assert "repa_projector" in loaded.params  # trained with the run, unused when sampling
    assert loaded.sample(jax.random.key(0), 2, steps=2).shape == (2, 8, 8, 1)

    vdm = changed(tiny_digits_config(digits_data_dir), {
        "repa.weight": 0.5, "repa.layer": 3, "training.objective": "vdm", "diffusion.process": "vdm",
        "diffusion.prediction": "eps", "vdm.decoder": "gaussian", "eval.metrics": ("digits",)})
    assert_build_errors([
        (vdm, r"^repa.weight: 0.5; REPA aligns the one forward pass of training.objective 'denoise', 'edm', "
              r"'flow_matching', not 'vdm'"),
        (changed(tiny_digits_config(digits_data_dir), {"repa.weight": 0.5}),
         r"^repa.layer: None; this backbone's taps are 1..3"),
        (changed(tiny_digits_config(digits_data_dir), {"repa.weight": 0.5, "repa.layer": 3,
                                                       "repa.encoder": "clip"}),
         r"^repa.encoder: unknown 'clip'; choose one of: digits, dinov2"),
    ])


def test_dinov2_encoder_reads_digits_as_repa_preprocesses_them(tmp_path):
    reference = save_tiny_dinov2(tmp_path)  # D = 32, patch 14
    encoder = repa.encoder("dinov2", str(tmp_path), resolution=28)
    x0 = np.random.default_rng(0).uniform(-1, 1, (3, 8, 8, 1)).astype(np.float32)
    features = jax.jit(encoder.apply)(encoder.params, jnp.asarray(x0))
    assert features.shape == (3, 2, 2, 32) and encoder.width == 32 == repa.encoder_width("dinov2", str(tmp_path))
    rgb = jax.image.resize(np.repeat((x0 + 1) / 2, 3, axis=-1), (3, 28, 28, 3), "bicubic", antialias=True)
    pixels = (np.asarray(rgb) - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]  # ImageNet's normalisation
    expected = hf_patch_tokens(reference, pixels.astype(np.float32)).reshape(3, 2, 2, 32)
    np.testing.assert_allclose(features, expected, atol=2e-5)


def test_the_encoders_weights_are_arguments_of_the_train_step_not_constants(digits_data_dir, tmp_path):
    """Closed over, the frozen encoder's weights would be embedded in the step's program (344 MB of HLO for
    DINOv2-B); `Objective.frozen` passes them as arguments, bound by `jit_train_step`."""
    save_tiny_dinov2(tmp_path)
    config = changed(tiny_digits_config(digits_data_dir), {
        "repa.weight": 0.5, "repa.layer": 3, "repa.encoder": "dinov2", "repa.encoder_path": str(tmp_path),
        "repa.encoder_resolution": 28})
    exp = experiment.build(config)
    frozen = exp.objective.frozen["repa_encoder"]
    batch = {"image": jax.ShapeDtypeStruct((16, 8, 8, 1), jnp.float32, sharding=exp.batch_sharding),
             "label": jax.ShapeDtypeStruct((16,), jnp.int32, sharding=exp.batch_sharding)}
    program = experiment.jit_train_step(exp, config).lower(exp.abstract_state, batch).as_text()
    constants = [np.prod([int(d) for d in shape.split("x")[:-1]])
                 for shape in re.findall(r"stablehlo.constant dense<[^>]*> : tensor<([0-9x]+f32)>", program)]
    weights = [leaf.size for leaf in jax.tree.leaves(frozen) if leaf.size > 1000]  # qkv 32x96, MLP, patches
    assert len(weights) >= 5 and max(constants) < min(weights)  # the largest constant: the 100-step schedule
    assert program.count("tensor<32x96xf32>") >= 2  # the two blocks' fused qkv kernels come in as arguments


def test_dinov2_encoder_config_errors(digits_data_dir, tmp_path):
    save_tiny_dinov2(tmp_path / "dinov2")
    (tmp_path / "weights.pth").write_bytes(b"\0")
    for path, message in [
        (None, r"^repa.encoder_path: None; repa.encoder='dinov2' reads a Hugging Face DINOv2 checkpoint"),
        (str(tmp_path / "absent"), r"^repa.encoder_path: no file or folder at .*absent$"),
        (str(tmp_path / "weights.pth"), r"^repa.encoder_path: .*weights.pth is neither a .safetensors file nor"),
    ]:
        for build in (lambda: repa.encoder_width("dinov2", path), lambda: repa.encoder("dinov2", path)):  # noqa: B023
            with pytest.raises(ConfigError, match=message):
                build()
    dinov2 = {"repa.weight": 0.5, "repa.layer": 3, "repa.encoder": "dinov2"}
    assert_build_errors([  # the run's setup and objective read repa.encoder_path and repa.encoder_resolution
        (changed(tiny_digits_config(digits_data_dir), dinov2), r"^repa.encoder_path: None; "),
        (changed(tiny_digits_config(digits_data_dir), dinov2 | {"repa.encoder_path": ""}),
         r"^repa.encoder_path: got ''; expected None or the path of a DINOv2 model.safetensors"),
        (changed(tiny_digits_config(digits_data_dir), dinov2 | {"repa.encoder_path": str(tmp_path / "dinov2"),
                                                                "repa.encoder_resolution": 30}),
         r"^repa.encoder_resolution: 30 is not a multiple of the encoder's patch size 14"),
    ])
