"""Encodes a latent diffusion run's dataset once with its frozen autoencoder (the latent cache).

    python -m diffusion_jax.data.encode_latents --config=configs/ldm_digits.py --out=runs/ldm_digits_latents
    python -m diffusion_jax.main --config=configs/ldm_digits.py --workdir=runs/ldm_digits \\
        --config.latent.cache_dir=runs/ldm_digits_latents

It reads the config's `latent.autoencoder_workdir` and `data.*` (name, split, image_size; with
`data.random_flip` the mirrored images are encoded too) and writes the posterior moments of every
image, in dataset order, to `--out` (default `latent.cache_dir`); the format is in
`diffusion_jax.data.latent_cache`. It streams the split in chunks of `--batch_size` and records
after each chunk how far it got, so a run that is stopped continues where it stopped when the same
command runs again. Batches are split over this machine's devices; it runs as one process.
"""

import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from diffusion_jax import latent
from diffusion_jax.data import captions, latent_cache, pipeline
from diffusion_jax.errors import ConfigError


def encode_latents(
    config: ml_collections.ConfigDict, out: str | Path | None = None, *, batch_size: int = 256,
    dtype: str = "float32",
) -> Path:
    """Writes (or finishes) the latent cache of `config` in `out` (None: `latent.cache_dir`); returns it.

    Raises one-line ConfigErrors naming the field: no `latent.autoencoder_workdir`, toy data, an `out`
    that holds a cache of other data or another autoencoder, a bad batch size or dtype.
    """
    if config.latent.get("autoencoder_workdir") is None:
        raise ConfigError("latent.autoencoder_workdir: None; the latent cache holds the latents of an autoencoder, "
                          "so name the workdir of a training.objective='autoencode' run")
    out = out if out is not None else config.latent.get("cache_dir")
    if out is None:
        raise ConfigError("--out: missing; name the cache directory (or set latent.cache_dir)")
    if dtype not in latent_cache.DTYPES:
        raise ConfigError(f"--dtype: {dtype!r}; allowed: {', '.join(latent_cache.DTYPES)}")
    if batch_size <= 0 or batch_size % jax.local_device_count():
        raise ConfigError(f"--batch_size: {batch_size}; a positive multiple of the {jax.local_device_count()} "
                          f"local devices it is split over")
    if jax.process_count() > 1:
        raise ConfigError("encode_latents runs as one process (run it on one host; the cache is read by all)")
    mesh = Mesh(np.array(jax.local_devices()), ("data",))
    first_stage = latent.load_first_stage(config, pipeline.example_shape(config.data),
                                          NamedSharding(mesh, PartitionSpec()))
    dataset, source = pipeline.open_split(config.data)
    num_examples = len(source)
    wanted = latent_cache.expected_meta(config, first_stage.workdir, first_stage.step, num_examples,
                                        first_stage.latent_shape, dtype)
    out = Path(out).expanduser()
    arrays = _open_arrays(out, wanted, with_levels=config.data.name == "digits")
    start = latent_cache.read_meta(out)["encoded"]
    if start == num_examples:
        logging.info("The latent cache in %s is complete (%d examples)", out, num_examples)
        return out

    batch_sharding = NamedSharding(mesh, PartitionSpec("data"))

    @jax.jit
    def moments_of(params: object, images: jax.Array) -> jax.Array:  # [B, S, S, C] -> [B, h, w, 2c]
        posterior = nnx.merge(first_stage.graphdef, params).encode(images)
        return jnp.concatenate([posterior.mean, posterior.logvar], axis=-1)

    flips = wanted["flips"]
    began = time.perf_counter()
    for begin in range(start, num_examples, batch_size):
        end = min(begin + batch_size, num_examples)
        images, labels = pipeline.decode_examples(dataset, config.data, source, range(begin, end))
        padded = np.zeros((batch_size, *images.shape[1:]), np.float32)
        padded[: end - begin] = images / 127.5 - 1.0
        views = [padded, padded[:, :, ::-1]] if flips else [padded]
        for v, view in enumerate(views):
            x = jax.device_put(view, batch_sharding)
            arrays["moments"][begin:end, v] = np.asarray(moments_of(first_stage.params, x))[: end - begin]
        arrays["labels"][begin:end] = labels
        if "caption_levels" in arrays:
            arrays["caption_levels"][begin:end] = captions.levels(captions.measure(images), labels)
        for array in arrays.values():
            array.flush()
        latent_cache.write_meta(out, wanted | {"encoded": end})  # only after the rows are on disk
        rate = (end - start) / (time.perf_counter() - began)
        logging.info("Encoded %d of %d examples (%.0f images/s)", end, num_examples, rate)
    return out


def _open_arrays(out: Path, wanted: dict, with_levels: bool) -> dict[str, np.memmap]:
    """The cache's arrays, created with meta `encoded` = 0 if `out` holds no cache, else reopened for
    writing after checking that they are a cache of the same data and autoencoder."""
    saved = latent_cache.read_meta(out)
    names = {"moments": latent_cache.MOMENTS, "labels": latent_cache.LABELS}
    if with_levels:
        names["caption_levels"] = latent_cache.CAPTION_LEVELS
    if saved is None:
        out.mkdir(parents=True, exist_ok=True)
        n = wanted["num_examples"]
        shapes = {
            "moments": ((n, 2 if wanted["flips"] else 1, *wanted["latent_shape"][:2], 2 * wanted["latent_shape"][2]),
                        wanted["dtype"]),
            "labels": ((n,), np.int32),
            "caption_levels": ((n, len(captions.PROPERTIES)), np.int8),
        }
        arrays = {k: np.lib.format.open_memmap(out / name, "w+", *shapes[k][::-1]) for k, name in names.items()}
        latent_cache.write_meta(out, wanted | {"encoded": 0})
        return arrays
    different = latent_cache.mismatch(saved, wanted)
    if different is None and saved["dtype"] != wanted["dtype"]:
        different = ("--dtype", saved["dtype"], wanted["dtype"])
    if different is not None or saved.get("format") != latent_cache.FORMAT:
        field, have, want = different or ("format", saved.get("format"), latent_cache.FORMAT)
        raise ConfigError(f"--out: {out} holds a latent cache with {field} = {have!r}, not this run's {want!r}; "
                          f"choose another --out (or delete {out} to write it anew)")
    return {k: np.load(out / name, mmap_mode="r+") for k, name in names.items()}


def _define_flags() -> None:
    """The command line's flags (defined only when run as a program, so that importing the module adds none)."""
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "The latent diffusion run's config file.", lock_config=True)
    flags.DEFINE_string("out", None, "The cache directory (default: the config's latent.cache_dir).")
    flags.DEFINE_integer("batch_size", 256, "Images encoded per step, split over the local devices.")
    flags.DEFINE_enum("dtype", "float32", list(latent_cache.DTYPES), "Storage dtype of the moments.")
    flags.mark_flags_as_required(["config"])


def main(argv: list[str]) -> None:
    """Command-line entry point (absl): the flags of the module docstring."""
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.INFO)
    config = flags.FLAGS.config
    try:
        out = encode_latents(config, flags.FLAGS.out, batch_size=flags.FLAGS.batch_size, dtype=flags.FLAGS.dtype)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    print(f"latents of {config.data.name} are in {out}; train with --config.latent.cache_dir={out}")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
