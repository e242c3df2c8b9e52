"""Drawing samples from a trained model and writing them where a person can look.

`<workdir>/samples/samples_<step>.png` is a grid (or a scatter plot for 2-D data)
and `samples_<step>.npz` holds `arr_0`: uint8 [N, H, W, C] images, the layout the
ADM (guided-diffusion) evaluator reads, or float32 [N, D] points.
"""

import math
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from PIL import Image

from diffusion_jax import guidance
from diffusion_jax.errors import ConfigError
from diffusion_jax.schedules import Schedule
from diffusion_jax.training.setup import model_apply, sampler_from_config

SampleFn = Callable[[nnx.State, jax.Array], jax.Array]  # (params, key) -> x_0 [B, ...]


def make_sample_fn(
    graphdef: nnx.GraphDef,
    schedule: Schedule,
    config: ml_collections.ConfigDict,
    example_shape: tuple[int, ...],
    sharding: NamedSharding,
) -> SampleFn:
    """A jitted `sample(params, key) -> x_0 [sample.batch_size, *example_shape]`.

    The whole chain is one compiled program (the sampler's `lax.scan`), compiled
    once and reused; the batch is split over the mesh's 'data' axis. Class-
    conditional models get labels 0, 1, 2, ... cycling over the classes, and with
    `sample.guidance_scale` = s classifier-free guidance (s = 1 + w of Ho & Salimans:
    s = 1 is the conditional model; see `guidance.classifier_free`).
    """
    sampler, options = sampler_from_config(config.sample)
    batch_size = config.sample.batch_size  # divisible by the device count: validation.validate_config
    num_classes = config.model.get("num_classes")
    labels = None if num_classes is None else jnp.arange(batch_size, dtype=jnp.int32) % num_classes
    guidance_scale = config.sample.get("guidance_scale")
    if guidance_scale is not None and num_classes is None:
        raise ConfigError("sample.guidance_scale: classifier-free guidance needs a class-conditional model "
                          "(set model.num_classes)")

    def sample(params: nnx.State, key: jax.Array) -> jax.Array:
        noise_key, chain_key = jax.random.split(key)
        x_T = jax.random.normal(noise_key, (batch_size, *example_shape), jnp.float32)
        x_T = jax.lax.with_sharding_constraint(x_T, sharding)

        def network(x_t: jax.Array, t: jax.Array, cond: jax.Array | None) -> jax.Array:
            return model_apply(graphdef, params, x_t, t, cond)

        if guidance_scale is not None and guidance_scale != 1.0:
            model_fn = guidance.classifier_free(network, labels, num_classes, guidance_scale - 1.0)
        else:

            def model_fn(x_t: jax.Array, t: jax.Array) -> jax.Array:
                return network(x_t, t, labels)

        return sampler(model_fn, schedule, chain_key, x_T, prediction=config.diffusion.prediction, **options)

    return jax.jit(sample, out_shardings=sharding)


def generate(sample_fn: SampleFn, params: nnx.State, key: jax.Array, num_samples: int) -> np.ndarray:
    """Calls `sample_fn` until `num_samples` samples exist; float32 [N, ...] on the host."""
    batches, drawn = [], 0
    while drawn < num_samples:
        batches.append(np.asarray(jax.device_get(sample_fn(params, jax.random.fold_in(key, len(batches))))))
        drawn += batches[-1].shape[0]
    return np.concatenate(batches)[:num_samples]


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[-1, 1] floats -> uint8 [0, 255], rounding as the ADM evaluator's inputs are."""
    return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def image_grid(images: np.ndarray, pad: int = 1) -> np.ndarray:
    """uint8 [N, H, W, C] -> one uint8 [rows*(H+pad)+pad, cols*(W+pad)+pad, C] picture."""
    n, h, w, c = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, cols)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = image
    return grid


def scatter_image(points: np.ndarray, size: int = 384, extent: float = 2.5) -> np.ndarray:
    """A [size, size, 3] uint8 scatter plot of 2-D points over [-extent, extent]^2."""
    picture = np.full((size, size, 3), 255, np.uint8)
    picture[size // 2, :] = picture[:, size // 2] = 200  # axes
    pix = np.round((points[:, :2] / extent + 1.0) * 0.5 * (size - 1)).astype(int)
    keep = np.all((pix >= 0) & (pix < size), axis=1)
    picture[size - 1 - pix[keep, 1], pix[keep, 0]] = (31, 119, 180)
    return picture


def save_samples(directory: str | Path, step: int, samples: np.ndarray, scale: int = 1) -> tuple[Path, Path]:
    """Writes samples_<step>.png (grid or scatter, upscaled `scale` times) and .npz."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    png, npz = directory / f"samples_{step}.png", directory / f"samples_{step}.npz"
    if samples.ndim == 4:
        images = to_uint8(samples)
        np.savez(npz, arr_0=images)
        grid = image_grid(images)
        picture = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
        if scale > 1:
            picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    else:
        np.savez(npz, arr_0=samples.astype(np.float32))
        picture = Image.fromarray(scatter_image(samples))
    picture.save(png)
    return png, npz
