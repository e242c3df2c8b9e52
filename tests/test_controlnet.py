"""ControlNet (Zhang et al. 2023): the zero-convolution identity at initialisation, the frozen base, the control
images made from the data, their errors, and a base run steered end to end."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import tiny_digits_config
from flax import nnx

import diffusion_jax as dj
from diffusion_jax import controlnet, objectives
from diffusion_jax.errors import ConfigError
from diffusion_jax.models.controlnet import ControlledUNet
from diffusion_jax.training import experiment, optimizer
from diffusion_jax.training.loop import train
from diffusion_jax.training.setup import build_model, build_process
from diffusion_jax.training.state import create
from diffusion_jax.training.step import make_train_step
from diffusion_jax.validation import validate_config

TINY = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0)


def randomised(params: nnx.State, seed: int, scale: float = 0.2) -> nnx.State:
    """`params` with every leaf drawn anew (numpy: no program per shape): a base that computes something (its
    output conv starts at zero)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(scale * rng.standard_normal(x.shape), jnp.float32), params)


def tiny_model(key: jax.Array) -> ControlledUNet:
    return ControlledUNet(8, 1, hint_channels=4, rngs=nnx.Rngs(key), **TINY)


@pytest.fixture(scope="module")
def model() -> ControlledUNet:
    """A tiny controlled U-Net at initialisation, its base randomised (initialised in one compiled program)."""
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: tiny_model(jax.random.key(0))))
    params = jax.jit(lambda key: nnx.state(tiny_model(key), nnx.Param))(jax.random.key(0))
    params["base"] = randomised(params["base"], 1)
    return nnx.merge(graphdef, params)


def inputs() -> tuple[jax.Array, jax.Array, jax.Array]:
    x = jax.random.normal(jax.random.key(2), (2, 8, 8, 1))
    control = (jax.random.uniform(jax.random.key(3), (2, 8, 8, 1)) > 0.5).astype(jnp.float32)
    return x, jnp.array([3, 70]), control


def test_at_initialisation_the_controlled_model_is_the_base_exactly(model):
    x, t, control = inputs()
    base = model.base(x, t)
    assert float(jnp.abs(base).max()) > 0.1
    assert np.array_equal(model(x, t, {"control": control}), base)
    assert np.array_equal(model(x, t), base)  # the null control
    graphdef, params = nnx.split(model)
    # Compiled, every residual is exactly zero; the two programs' outputs may differ in the last bit where XLA
    # fuses the decoder's reductions differently.
    mid, skips = jax.jit(lambda p: nnx.merge(graphdef, p).control(x, t, None, control))(params)
    assert not np.any(mid) and not any(np.any(s) for s in skips)

    for zero in ("mid_zero", "zero_convs"):  # a zero convolution made non-zero: the output moves
        perturbed = nnx.merge(graphdef, params)
        layer = perturbed.control.mid_zero if zero == "mid_zero" else perturbed.control.zero_convs[1]
        layer.kernel.value = layer.kernel.value + 0.5
        assert not np.allclose(perturbed(x, t, {"control": control}), base, atol=1e-3), zero


def test_the_copy_starts_as_the_base_encoder_with_a_zero_hint_slice(model):
    graphdef, params = nnx.split(model, nnx.Param)
    fresh = jax.jit(lambda key: nnx.state(tiny_model(key), nnx.Param))(jax.random.key(5))
    started = nnx.to_pure_dict(controlnet.with_base(fresh, params["base"]))
    base, copy = started["base"], started["control"]
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, base, nnx.to_pure_dict(params["base"]))))
    for name in ("cond", "down", "mid_block1", "mid_attn", "mid_block2"):
        assert all(jax.tree.leaves(jax.tree.map(np.array_equal, copy[name], base[name]))), name
    kernel = copy["conv_in"]["kernel"]  # [3, 3, 1 + 4, 8]: x slice from the base, E(c) slice zero
    assert np.array_equal(kernel[:, :, :1], base["conv_in"]["kernel"]) and not np.any(kernel[:, :, 1:])
    assert not np.any(copy["mid_zero"]["kernel"]) and not any(np.any(z["kernel"]) for z in copy["zero_convs"].values())


def test_a_train_step_moves_the_control_branch_and_leaves_the_base_bit_identical(model, digits_data_dir):
    config = controlnet_config(digits_data_dir, "unused")
    shape = (8, 8, 1)
    graphdef, init = build_model(config, shape)
    params = randomised(init(jax.random.key(0)), 4, 0.05)  # every zero conv non-zero too
    tx = optimizer.make_optimizer(config.optim, 10, controlnet.frozen(config))
    objective = objectives.build(config, graphdef, build_process(config), shape)
    step = jax.jit(make_train_step(graphdef, objective, tx, lambda s: 1e-3, config))
    images = jax.random.uniform(jax.random.key(6), (4, *shape), minval=-1.0, maxval=1.0)
    state = create(params, tx, 1, jax.random.key(7))
    for _ in range(2):
        state, metrics = step(state, {"image": images, "label": jnp.zeros(4, jnp.int32)})
    assert np.isfinite(float(metrics["loss"]))
    same = jax.tree.map(np.array_equal, state.params["base"], params["base"])
    assert all(jax.tree.leaves(same))  # AdamW's weight decay included
    moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), state.params["control"], params["control"])
    assert all(jax.tree.leaves(moved))


def test_control_images_of_a_known_digit():
    image = -np.ones((1, 8, 8, 1), np.float32)
    image[0, 2:6, 2:6] = 1.0  # a 4x4 white square
    mask = np.asarray(controlnet.make_control("mask", jnp.asarray(image)))[0, ..., 0]
    assert np.array_equal(mask, (image[0, ..., 0] > 0).astype(np.float32))  # on the 2x2 cells exactly
    image[0, 2, 2] = -1.0  # a cell three-quarters full is still in (mean 0.75 > 0.3), one with one pixel not
    image[0, 6, 6] = 1.0
    assert np.array_equal(np.asarray(controlnet.make_control("mask", jnp.asarray(image)))[0, ..., 0], mask)
    image = -np.ones((1, 8, 8, 1), np.float32)
    image[0, :, 4:] = 1.0  # a vertical step between columns 3 and 4
    edges = np.asarray(controlnet.make_control("edges", jnp.asarray(image)))[0, ..., 0]
    expected = np.zeros((8, 8), np.float32)
    expected[:, 3:5] = 1.0
    assert np.array_equal(edges, expected)
    with pytest.raises(ConfigError, match=r"^controlnet.control: unknown 'canny'; choose one of: edges, mask$"):
        controlnet.make_control("canny", jnp.asarray(image))


def controlnet_config(data_dir: str, base_workdir) -> ml_collections.ConfigDict:
    config = tiny_digits_config(data_dir)
    config.model.name = "controlnet_unet"
    config.model.hint_channels = 4
    config.model.dropout = 0.0
    config.diffusion.prediction = "v"
    config.controlnet.base_workdir = str(base_workdir)
    config.optim.update(name="adamw", weight_decay=0.1)
    config.training.update(num_steps=2, checkpoint_every=2, sample_every=0, ema_decays=(0.9,))
    config.sample.update(ema_decay=0.9, steps=3)
    return config


def test_sample_inputs_and_a_wrong_size_control_image(digits_data_dir, tmp_path):
    config = controlnet_config(digits_data_dir, "unused")
    test_images, _ = dj.data.load_split(config.data, "test")
    given = controlnet.sample_inputs(config, 5)["control"]
    expected = controlnet.make_control("mask", jnp.asarray(test_images[:5] / 127.5 - 1.0))
    assert given.dtype == np.float32 and np.array_equal(given, expected)
    assert controlnet.sample_inputs(tiny_digits_config(digits_data_dir), 5) == {}

    masks = np.zeros((2, 8, 8, 1), np.uint8)
    masks[1, 2:6, 2:6] = 255
    np.savez(tmp_path / "ok.npz", arr_0=masks)
    config.sample.control_image = str(tmp_path / "ok.npz")
    assert np.array_equal(controlnet.sample_inputs(config, 3)["control"], masks[[0, 1, 0]] / 255.0)
    np.savez(tmp_path / "big.npz", arr_0=np.zeros((2, 16, 16, 1), np.uint8))
    config.sample.control_image = str(tmp_path / "big.npz")
    with pytest.raises(ConfigError, match=r"^sample.control_image: .*big.npz .*\(16, 16, 1\).*\(8, 8, 1\)$"):
        controlnet.sample_inputs(config, 3)
    x, t, control = inputs()
    with pytest.raises(ValueError, match=r"^cond\['control'\]: .*\[2, 8, 8, 1\].* got \[2, 4, 4, 1\]"):
        nnx.eval_shape(lambda: tiny_model(jax.random.key(0))(x, t, {"control": control[:, :4, :4]}))


def test_config_errors_name_the_field(digits_data_dir):
    for fields, message in [({"controlnet.control": "canny"}, r"^controlnet.control: got 'canny'; expected"),
                            ({"training.objective": "edm"}, r"^training.objective: 'edm'; a ControlNet"),
                            ({"model.pretrained": "x.pt"}, r"^model.pretrained: 'x.pt'; a ControlNet")]:
        config = controlnet_config(digits_data_dir, "unused")
        config.update_from_flattened_dict(fields)
        with pytest.raises(ConfigError, match=message):
            validate_config(config, 1, 1)


@pytest.fixture(scope="module")
def base_workdir(tmp_path_factory, digits_data_dir):
    config = tiny_digits_config(digits_data_dir)
    config.diffusion.prediction = "v"
    config.model.dropout = 0.0
    config.optim.warmup_steps = 0  # a step that moves its output conv from zero: a base with an output to steer
    config.training.update(num_steps=1, checkpoint_every=1, sample_every=0, ema_decays=(0.9,))
    config.sample.ema_decay = 0.9
    workdir = tmp_path_factory.mktemp("base")
    train(config, workdir)
    return workdir


@pytest.mark.slow  # two runs and two samplers compiled: about 2 minutes on 2 cores
def test_a_controlnet_run_steers_a_frozen_base_run(base_workdir, digits_data_dir, tmp_path):
    config = controlnet_config(digits_data_dir, base_workdir)
    final = train(config, tmp_path / "run")
    base = dj.load(base_workdir).params  # the EMA the base samples with
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, final.params["base"], base)))
    started = nnx.to_pure_dict(final.params["control"])
    assert np.any(started["mid_zero"]["kernel"])  # the zero convolutions have moved
    result = controlnet.score(str(tmp_path / "run"), 8)
    assert 0.0 <= result["controlnet_iou"] <= 1.0 and 0.0 <= result["base_iou"] <= 1.0 and result["step"] == 2

    for fields, message in [({"model.ch": 16}, r"^controlnet.base_workdir: .*'s U-Net has model.ch=8; this config 16"),
                            ({"diffusion.prediction": "eps"}, r"^controlnet.base_workdir: .* trained "
                                                               r"diffusion.prediction='v'; this config 'eps'"),
                            ({"diffusion.schedule": "cosine"}, r"^controlnet.base_workdir: .* another noise schedule"),
                            ({"controlnet.base_workdir": None}, r"^controlnet.base_workdir: None")]:
        config = controlnet_config(digits_data_dir, base_workdir)
        config.update_from_flattened_dict(fields)
        with pytest.raises(ConfigError, match=message):
            experiment.build(config)
