"""Super-resolution (SR3) and cascades (CDM): the U-Net's low-res conditioning, the noise-conditioning
augmentation, the sampling inputs and their errors, the low-res-consistent denoiser, and a tiny cascade."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_digits_config
from flax import nnx
from PIL import Image

from diffusion_jax import conditioning, models, samplers, schedules, sde, super_resolution
from diffusion_jax.data import load_split
from diffusion_jax.errors import ConfigError
from diffusion_jax.training import experiment
from diffusion_jax.training.loop import train
from diffusion_jax.training.sampling import generate, make_sample_fn

# AdaGN: at 8 channels GroupNorm normalises each channel alone and would cancel DDPM's added embedding
UNET = dict(image_size=8, in_channels=1, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0,
            use_scale_shift_norm=True)


def unet(**kwargs) -> nnx.Module:
    return models.create("unet", rngs=nnx.Rngs(0), **UNET, **kwargs)


def shapes(**kwargs) -> dict[str, tuple[int, ...]]:
    """The parameter shapes of `unet(**kwargs)`, found abstractly (nothing allocated or compiled)."""
    state = nnx.state(nnx.eval_shape(lambda: unet(**kwargs)), nnx.Param)
    return {".".join(map(str, path)): tuple(v.shape) for path, v in nnx.to_flat_state(state)}


@pytest.fixture(scope="module")
def sr_unet():
    """An 8x8 SR U-Net on 4x4 inputs with trained-looking weights (every zero-initialised layer made non-zero)."""
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: unet(low_res_size=4)))
    params = jax.jit(lambda: jax.tree.map(lambda p: p + 0.05 * jnp.sin(jnp.arange(p.size).reshape(p.shape)),
                                          nnx.split(unet(low_res_size=4))[1]))()
    return jax.jit(lambda x, t, cond: nnx.merge(graphdef, params)(x, t, cond))


def test_the_unet_concatenates_the_upsampled_low_res_image_and_embeds_its_noise_level(sr_unet):
    apply = sr_unet
    plain = shapes()
    assert shapes(low_res_size=None) == plain  # off: the same tree
    ours = shapes(low_res_size=4)
    assert ours["conv_in.kernel"] == (3, 3, 2, 8)  # [x_t, upsampled low_res]
    assert {k for k in ours if k not in plain} == {f"cond.low_res_noise.{layer}.{p}" for layer in ("dense0", "dense1")
                                                   for p in ("kernel", "bias")}
    assert {k: v for k, v in ours.items() if k in plain and k != "conv_in.kernel"} == {
        k: v for k, v in plain.items() if k != "conv_in.kernel"}

    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
    t = jnp.array([10, 600])
    low_res = jax.random.uniform(jax.random.key(2), (2, 4, 4, 1), minval=-1, maxval=1)
    cond = {"low_res": low_res, "low_res_noise": jnp.zeros(2)}
    out = apply(x, t, cond)
    assert np.abs(out - apply(x, t, cond | {"low_res": -low_res})).max() > 1e-3  # the image matters
    assert np.abs(out - apply(x, t, cond | {"low_res_noise": jnp.full(2, 0.3)})).max() > 1e-3  # and its level
    # Missing entries are the null ones: zeros.
    np.testing.assert_allclose(apply(x, t, None), apply(x, t, conditioning.null(cond)), atol=1e-6)

    with pytest.raises(ValueError, match=r"cond\['low_res'\]: model.low_res_size=4 expects \[2, 4, 4, 1\], got "
                                         r"\[2, 8, 8, 1\]"):
        nnx.eval_shape(lambda: unet(low_res_size=4)(x, t, {"low_res": x}))
    with pytest.raises(ValueError, match="cond: a low-resolution image was given to a model built without "
                                         "model.low_res_size"):
        nnx.eval_shape(lambda: unet()(x, t, cond))
    with pytest.raises(ConfigError, match="model.low_res_size: got 3; .* smaller than data.image_size=8 and divide"):
        nnx.eval_shape(lambda: unet(low_res_size=3))


def test_area_downsampling_and_its_pseudo_inverse():
    x = np.arange(2 * 8 * 8 * 3, dtype=np.float32).reshape(2, 8, 8, 3)
    down = super_resolution.area_downsample(x, 4)
    np.testing.assert_allclose(down[0, 1, 2], x[0, 2:4, 4:6].mean(axis=(0, 1)))
    np.testing.assert_allclose(super_resolution.area_downsample(super_resolution.nearest_upsample(down, 2), 4), down)


def test_augmentation_is_the_forward_process_at_the_level_and_exact_at_zero():
    schedule = schedules.get("cosine", 1000)
    x = np.random.default_rng(0).uniform(-1, 1, (3, 4, 4, 1))
    noise = np.random.default_rng(1).standard_normal(x.shape)
    levels = np.array([0.0, 0.3, 0.9])
    out = super_resolution.augment(schedule, x, levels, noise)
    np.testing.assert_array_equal(out[0], x[0])  # level 0: the clean image, exactly
    alpha, sigma = sde.as_process(schedule).alpha_sigma(0.3 * 999.0)
    np.testing.assert_allclose(out[1], alpha * x[1] + sigma * noise[1], rtol=1e-6)
    assert np.std(out[2] - x[2]) > np.std(out[1] - x[1]) > 0.1  # more noise at a higher level


def test_training_condition_draws_levels_up_to_the_max_and_leaves_other_runs_alone(digits_data_dir):
    config = tiny_digits_config(digits_data_dir)
    images = jax.random.uniform(jax.random.key(0), (4096, 8, 8, 1), minval=-1, maxval=1)
    labels = jnp.arange(4096) % 10
    assert super_resolution.training_condition(config, labels, images, jax.random.key(1)) is labels  # not SR
    config.model.low_res_size = 4
    clean = super_resolution.training_condition(config, labels, images, jax.random.key(1))  # max level 0: SR3
    np.testing.assert_array_equal(clean["label"], labels)
    np.testing.assert_array_equal(clean["low_res"], super_resolution.area_downsample(images, 4))
    np.testing.assert_array_equal(clean["low_res_noise"], 0.0)
    config.training.low_res_noise_max = 0.5
    cond = jax.jit(lambda x: super_resolution.training_condition(config, None, x, jax.random.key(1)))(images)
    level = np.asarray(cond["low_res_noise"])
    assert set(cond) == {"low_res", "low_res_noise"} and level.min() >= 0.0 and level.max() <= 0.5
    assert abs(level.mean() - 0.25) < 0.01 and abs(np.mean(level < 0.1) - 0.2) < 0.03  # U[0, 0.5]
    err = np.abs(np.asarray(cond["low_res"]) - np.asarray(clean["low_res"])).mean(axis=(1, 2, 3))
    assert np.corrcoef(level, err)[0, 1] > 0.8  # noisier where the level is higher


def test_sample_inputs_read_the_test_split_or_a_file_and_name_a_wrong_size(digits_data_dir, tmp_path):
    config = tiny_digits_config(digits_data_dir)
    assert super_resolution.sample_inputs(config, 4) == {}  # not a super-resolution run
    config.model.low_res_size = 4
    inputs = super_resolution.sample_inputs(config, 5)
    test, _ = load_split(config.data, "test")
    np.testing.assert_allclose(inputs["low_res"], super_resolution.area_downsample(test[:5] / 127.5 - 1.0, 4),
                               atol=1e-6)
    assert inputs["low_res"].dtype == np.float32 and inputs["low_res_noise"].tolist() == [0.0] * 5

    np.savez(tmp_path / "low.npz", arr_0=np.stack([np.full((4, 4, 1), 255, np.uint8), np.zeros((4, 4, 1), np.uint8)]))
    config.sample.update(low_res_image=str(tmp_path / "low.npz"), low_res_noise=0.2)
    inputs = super_resolution.sample_inputs(config, 3)
    np.testing.assert_allclose(inputs["low_res_noise"], 0.2)
    assert inputs["low_res"][0].mean() > 0.5 and inputs["low_res"][1].mean() < -0.5  # cycled, noised
    assert 0.01 < np.std(inputs["low_res"][0]) < 0.5

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "big.png")
    config.sample.low_res_image = str(tmp_path / "big.png")
    with pytest.raises(ConfigError, match=r"^sample.low_res_image: .*big.png holds images of \(8, 8, 1\); "
                                          r".*\(4, 4, 1\)"):
        super_resolution.sample_inputs(config, 2)


def test_the_consistent_denoiser_makes_the_downsampled_sample_the_low_res_image():
    schedule = schedules.get("linear", 1000)
    low_res = jax.random.uniform(jax.random.key(3), (4, 4, 4, 1), minval=-0.9, maxval=0.9)
    x_T = jax.random.normal(jax.random.key(4), (4, 8, 8, 1))

    def model_fn(x_t, t):  # any denoiser: the projection does not need it to have learnt the constraint
        return jnp.tanh(0.7 * x_t) + 0.1 * jnp.sin(3.0 * x_t + t[:, None, None, None] / 100.0)

    for name, prediction in (("ddim", "eps"), ("ddpm", "v")):
        sampler = samplers.get(name)
        plain = sampler(model_fn, schedule, jax.random.key(5), x_T, steps=10, prediction=prediction, clip_x0=None)
        consistent = super_resolution.consistent_denoiser(model_fn, schedule, prediction, low_res)
        x0 = sampler(consistent, schedule, jax.random.key(5), x_T, steps=10, prediction=prediction, clip_x0=None)
        assert np.abs(super_resolution.area_downsample(plain, 4) - low_res).max() > 0.1
        np.testing.assert_allclose(super_resolution.area_downsample(x0, 4), low_res, atol=1e-4)  # float32 round-off


def test_a_tiny_sr_run_trains_and_samples_from_the_low_res_images_given(digits_data_dir):
    config = tiny_digits_config(digits_data_dir)
    config.model.low_res_size = 4
    config.training.low_res_noise_max = 0.3
    exp = experiment.build(config)
    state = exp.init_state()
    step = experiment.jit_train_step(exp, config)
    batch = {"image": jax.random.uniform(jax.random.key(0), (16, 8, 8, 1), minval=-1, maxval=1),
             "label": jnp.zeros(16, jnp.int32)}
    initial = np.asarray(state.params["conv_in"]["kernel"])
    for _ in range(4):  # lr 0 at step 0 (warmup); the zero-initialised conv_out passes no gradient before it moves
        state, metrics = step(state, batch)
    assert np.isfinite(float(metrics["loss"]))
    assert np.abs(np.asarray(state.params["conv_in"]["kernel"])[:, :, 1] - initial[:, :, 1]).max() > 0  # low_res

    inputs = super_resolution.sample_inputs(config, 8)
    params = experiment.sampling_params(config, state)
    samples, _ = generate(exp.sample_fn, params, jax.random.key(2), 8, inputs=inputs, batch_size=8)
    assert samples.shape == (8, 8, 8, 1) and np.isfinite(samples).all()
    other, _ = generate(exp.sample_fn, params, jax.random.key(2), 8, inputs=inputs | {"low_res": -inputs["low_res"]},
                        batch_size=8)
    assert np.abs(other - samples).max() > 0  # the samples depend on the low-res images given

    config.sample.update(low_res_consistency=True, clip_x0=None)  # sample mode's switch for the projection
    consistent = make_sample_fn(exp.graphdef, exp.schedule, config, exp.example_shape, exp.batch_sharding)
    projected, _ = generate(consistent, params, jax.random.key(2), 8, inputs=inputs, batch_size=8)
    np.testing.assert_allclose(super_resolution.area_downsample(projected, 4), inputs["low_res"], atol=1e-4)


@pytest.mark.slow
def test_a_cascade_draws_its_low_res_images_from_the_stage1_run(digits_data_dir, tmp_path):
    stage1 = tiny_digits_config(digits_data_dir)  # a tiny 4x4 digits DDPM trained for 2 steps
    stage1.data.image_size = 4
    stage1.model.update(ch_mult=(1,), attn_resolutions=())
    stage1.training.update(num_steps=2, checkpoint_every=2, sample_every=0, log_every=0)
    stage1.sample.update(steps=3, num_samples=8)
    train(stage1, tmp_path)

    config = tiny_digits_config(digits_data_dir)
    config.model.low_res_size = 4
    config.sample.low_res_workdir = str(tmp_path)
    inputs = super_resolution.cascade_inputs(config, 8, jax.random.key(1))
    assert inputs["low_res"].shape == (8, 4, 4, 1) and inputs["low_res_noise"].shape == (8,)
    levels = (inputs["low_res"] + 1.0) * 127.5
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)  # on the 8-bit grid, as stage 1 writes them

    config.update_from_flattened_dict({"data.image_size": 16, "model.low_res_size": 8})
    with pytest.raises(ConfigError, match=r"^sample.low_res_workdir: .* makes images of \[4, 4, 1\]; this model "
                                          r"\(model.low_res_size=8\) takes \[8, 8, 1\]$"):
        super_resolution.cascade_inputs(config, 8, jax.random.key(1))


def test_config_errors_name_the_field(digits_data_dir):
    from diffusion_jax.validation import validate_config

    cases = [({"model.low_res_size": 5}, r"^model.low_res_size: got 5; .* smaller than data.image_size=8 and divide"),
             ({"model.low_res_size": 8}, r"^model.low_res_size: got 8;"),
             ({"model.low_res_size": 4, "sample.low_res_image": "a.png", "sample.low_res_workdir": "runs/x"},
              r"^sample.low_res_image: set together with sample.low_res_workdir"),
             ({"training.low_res_noise_max": 1.5},
              r"^training.low_res_noise_max: got 1.5; expected a float in \[0, 1\)")]
    for fields, message in cases:
        config = tiny_digits_config(digits_data_dir)
        config.update_from_flattened_dict(fields)
        with pytest.raises(ConfigError, match=message):
            validate_config(config, 1, 1)
