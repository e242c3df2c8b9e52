"""Super-resolution and cascades: SR3's conditioning and CDM's noise-conditioning augmentation.

SR3 (Saharia et al. 2021, arXiv 2104.07636, §2.4) trains a diffusion model of the high-resolution image y
conditioned on a low-resolution image x: the U-Net (`model.low_res_size`, `models.UNet`) sees x upsampled
to its resolution, concatenated to y_t. A cascade (Ho et al. 2021, "Cascaded diffusion models", CDM, arXiv
2106.15282) samples x from a low-resolution diffusion model first; to make the super-resolution stage robust
to the difference between the data it was trained on and stage-1 samples, CDM's Gaussian conditioning
augmentation (§4.3) trains it on x noised by the forward process at a random level s, z_s = α_s x + σ_s ε,
with s given to the model, and samples it at a small fixed s.

Here x is the high-resolution image area-downsampled (each output pixel the mean of an f x f block,
f = image_size / low_res_size), so "the output downsampled equals the input" is a linear constraint,
A y = x. The level s ∈ [0, 1] is a fraction of the run's own forward process: model time
t_s = t_min + s (t_max - t_min) of its (α, σ) view (`sde.as_process`), s = 0 the clean image exactly.

Conditioning entries (`diffusion_jax.conditioning`): `low_res` float [B, h, w, C] in [-1, 1] (already
augmented) and `low_res_noise` float [B], the level s.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffusion_jax import conditioning, diffusion, editing, sde
from diffusion_jax.data import example_shape
from diffusion_jax.errors import ConfigError
from diffusion_jax.inverse import area_downsample  # the operator A of SR3's consistency constraint
from diffusion_jax.training.setup import Process, build_process

Array = np.ndarray | jax.Array  # the helpers keep the kind they are given


def nearest_upsample(images: Array, factor: int) -> Array:
    """[B, h, w, C] -> [B, f h, f w, C], each pixel repeated over an f x f block: A⁺, the pseudo-inverse of
    `area_downsample` A (A Aᵀ = I / f², so A⁺ = Aᵀ (A Aᵀ)⁻¹ = f² Aᵀ, and A A⁺ = I)."""
    return images.repeat(factor, axis=1).repeat(factor, axis=2)


def consistent_denoiser(
    model_fn: diffusion.ModelFn, process: Process, prediction: str, low_res: jax.Array
) -> diffusion.ModelFn:
    """`model_fn(x_t, t)` of the same `prediction` kind whose x̂_0 is projected onto {x : A x = y}, y = `low_res`
    [B, h, w, C] and A `area_downsample`: x̂_0 + A⁺(y - A x̂_0), the range-null-space decomposition A⁺ y +
    (I - A⁺ A) x̂_0 of DDNM (Wang et al. 2023, arXiv 2212.00490, Eq. 8), which keeps what the model put in
    A's null space (the detail) and replaces the rest by the input's. A sampler driven by it ends on an x̂_0 whose
    area-downsampled image is y (up to x̂_0 clipping), however well the model learnt SR3's consistency. Meant for
    the clean low-res image (`low_res_noise` 0): projecting onto a noised one would copy its noise."""

    def projected(denoise: Callable[[jax.Array], jax.Array], x_t: jax.Array, *_: jax.Array) -> jax.Array:
        x0 = denoise(x_t)  # [B, H, W, C]
        factor = x0.shape[1] // low_res.shape[1]
        return x0 + nearest_upsample(low_res.astype(x0.dtype) - area_downsample(x0, low_res.shape[1]), factor)

    return diffusion.with_x0(model_fn, process, prediction, projected)


def augment(process: Process, low_res: Array, level: Array, noise: Array) -> Array:
    """CDM's Gaussian conditioning augmentation (Ho et al. 2021, §4.3): z_s = α(t_s) x + σ(t_s) ε at model time
    t_s = t_min + s (t_max - t_min) of `process`, for x `low_res` [B, h, w, C], s `level` [B] in [0, 1] and ε
    `noise` shaped like x; s = 0 returns x exactly. NumPy in, NumPy out (float64 levels on the host)."""
    continuous = sde.as_process(process)
    xp = np if isinstance(low_res, np.ndarray) else jnp
    t = continuous.t_min + level * (continuous.t_max - continuous.t_min)  # [B]
    alpha, sigma = continuous.alpha_sigma(t)
    noised = alpha[:, None, None, None] * low_res + sigma[:, None, None, None] * noise
    return xp.where((level > 0)[:, None, None, None], noised, low_res).astype(low_res.dtype)


def training_condition(
    config: ml_collections.ConfigDict, cond: conditioning.Cond, images: jax.Array, key: jax.Array
) -> conditioning.Cond:
    """A super-resolution run's training condition: `cond` with `low_res`, the batch `images` [B, H, W, C]
    area-downsampled to `model.low_res_size`, noised at levels s ~ U[0, `training.low_res_noise_max`] drawn
    per example with `key` (CDM §4.3; max 0 is SR3's clean conditioning), and `low_res_noise` = s [B].
    `cond` unchanged for every other run."""
    size = config.model.get("low_res_size")
    if size is None:
        return cond
    low_res = area_downsample(images, size)  # [B, h, w, C]
    max_level = config.training.get("low_res_noise_max", 0.0)
    level_key, noise_key = jax.random.split(key)
    level = max_level * jax.random.uniform(level_key, (images.shape[0],))  # [B]
    if max_level > 0:
        with jax.ensure_compile_time_eval():  # the schedule's tables: constants, also inside the jitted train step
            process = sde.as_process(build_process(config))
        low_res = augment(process, low_res, level, jax.random.normal(noise_key, low_res.shape))
    return conditioning.as_dict(cond) | {"low_res": low_res, "low_res_noise": level}


def conditioning_inputs(config: ml_collections.ConfigDict, low_res: np.ndarray) -> dict[str, np.ndarray]:
    """{'low_res', 'low_res_noise'} for clean low-res images [N, h, w, C] in [-1, 1], augmented at
    `sample.low_res_noise` with noise drawn from `seed` (the same inputs every time)."""
    level = np.full(len(low_res), float(config.sample.get("low_res_noise", 0.0)))  # [N]
    if level[0] > 0:
        noise = np.random.default_rng(config.seed).standard_normal(low_res.shape)
        low_res = augment(build_process(config), low_res.astype(np.float64), level, noise)
    return {"low_res": low_res.astype(np.float32), "low_res_noise": level.astype(np.float32)}


def sample_inputs(config: ml_collections.ConfigDict, num: int) -> dict[str, np.ndarray]:
    """The conditioning a super-resolution run samples `num` images with: {'low_res': float32 [num, h, w, C]
    in [-1, 1], 'low_res_noise': float32 [num]}, from `sample.low_res_image` (a .png: one image for every
    example; an .npz: `arr_0` uint8 [N, h, w, C] as `samples_<step>.npz`, cycled; `editing.load_images`) or by
    default (None or 'test') the test split's first `num` images area-downsampled, augmented at
    `sample.low_res_noise`. {} for a run that is not super-resolution. A low-res image of another size is a
    one-line ConfigError naming `sample.low_res_image` and the shape expected."""
    size = config.model.get("low_res_size")
    if size is None:
        return {}
    shape = example_shape(config.data)  # [H, W, C]
    path = config.sample.get("low_res_image")
    if path in (None, "test"):
        images, _ = editing.load_images("test", "sample.low_res_image", num, shape, config.data)  # [num, H, W, C]
        return conditioning_inputs(config, area_downsample(images, size))
    low_res, _ = editing.load_images(path, "sample.low_res_image", num, (size, size, shape[-1]), config.data)
    return conditioning_inputs(config, low_res)


def cascade_inputs(config: ml_collections.ConfigDict, num: int, key: jax.Array) -> dict[str, np.ndarray]:
    """`sample_inputs` of a cascade's second stage: with `sample.low_res_workdir`, `num` samples drawn with
    `key` from that stage-1 run (its newest checkpoint, its own `config.sample`: sampler, steps, EMA; CDM's
    pipeline) as `low_res`, on the 8-bit grid its sample files hold, augmented at `sample.low_res_noise`;
    without one, `sample_inputs(config, num)`. A stage-1 run whose images are not
    [model.low_res_size, model.low_res_size, C] is a one-line ConfigError naming `sample.low_res_workdir`."""
    from diffusion_jax.loading import load  # loading and sampling build on the training modules that use this one
    from diffusion_jax.training import mesh as mesh_lib
    from diffusion_jax.training.sampling import generate, make_sample_fn, to_uint8

    workdir = config.sample.get("low_res_workdir")
    size = config.model.get("low_res_size")
    if workdir is None or size is None:
        return sample_inputs(config, num)
    mesh = mesh_lib.make_mesh(config.get("mesh"))
    stage1 = load(workdir, sharding=mesh_lib.replicated(mesh), field="sample.low_res_workdir")
    expected = (size, size, example_shape(config.data)[-1])
    if stage1.example_shape != expected:
        raise ConfigError(f"sample.low_res_workdir: {workdir} makes images of {list(stage1.example_shape)}; this "
                          f"model (model.low_res_size={size}) takes {list(expected)}")
    if stage1.config.model.get("low_res_size") is not None:
        raise ConfigError(f"sample.low_res_workdir: {workdir} is itself a super-resolution run; a cascade here "
                          "has two stages, the first unconditional")
    sample_fn = make_sample_fn(stage1.graphdef, stage1.schedule, stage1.config, stage1.example_shape,
                               mesh_lib.batch_sharding(mesh))
    samples, _ = generate(sample_fn, stage1.params, key, num)  # float32 [num, h, w, C]
    return conditioning_inputs(config, to_uint8(samples).astype(np.float32) / 127.5 - 1.0)
