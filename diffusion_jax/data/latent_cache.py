"""Cached latents: a latent diffusion run's dataset encoded once by its frozen autoencoder.

LDM trains on z ~ q(z|x) of a frozen first stage. Encoding every batch again costs an encoder
forward per step (`benchmarks/latent.py`); at ImageNet scale the pixels do not even fit in memory.
`python -m diffusion_jax.data.encode_latents` (the writer) stores the posterior's moments of every
image once, and the training pipeline (`pipeline.create_iterator(..., latent_cache=...)`) gathers
them instead of pixels; `latent.training_batches` draws z = mean + std * eps from them with the
same key per step as the on-the-fly path, so a cached run trains on the same latents (up to the
encoder's batch-size-dependent rounding) as one that encodes as it goes. Storing the moments, not
one sample, keeps LDM's fresh posterior sample per step (fast-DiT stores a single sample).

A cache directory holds:
  meta.json                  what was encoded (below); `encoded` counts the rows written so far
  moments.npy                float32|float16 [N, V, h, w, 2c]: mean then clipped logvar of q(z|x);
                             V = 2 when written with data.random_flip (the image, then its mirror)
  labels.npy                 int32 [N]
  caption_levels.npy         int8 [N, P] (digits only: the measured levels captions are made from)

meta.json: {"format": 1, "autoencoder": {"workdir", "step"}, "data": {"name", "split", "image_size"},
"flips": bool, "num_examples": N, "latent_shape": [h, w, c], "dtype", "encoded": n}.
"""

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from diffusion_jax.errors import ConfigError

FORMAT = 1
META, MOMENTS, LABELS, CAPTION_LEVELS = "meta.json", "moments.npy", "labels.npy", "caption_levels.npy"
DTYPES = ("float32", "float16")
WRITE_COMMAND = "python -m diffusion_jax.data.encode_latents --config=CONFIG --out={out}"


@dataclasses.dataclass(frozen=True)
class LatentCache:
    """An opened cache: arrays memory-mapped from disk, read row by row as batches gather them."""

    directory: Path
    moments: np.ndarray  # [N, V, h, w, 2c], a read-only memmap
    labels: np.ndarray  # int32 [N]
    caption_levels: np.ndarray | None  # int8 [N, P]
    meta: dict[str, Any]

    @property
    def flips(self) -> bool:
        """Whether row v = 1 holds the mirrored images' moments."""
        return self.meta["flips"]


def expected_meta(
    config: Any, autoencoder_workdir: str, autoencoder_step: int, num_examples: int,
    latent_shape: tuple[int, int, int], dtype: str,
) -> dict[str, Any]:
    """The meta.json of a complete cache of `config`'s data under this autoencoder (`encoded` = N)."""
    return {
        "format": FORMAT,
        "autoencoder": {"workdir": str(Path(autoencoder_workdir).expanduser().resolve()), "step": autoencoder_step},
        "data": data_fields(config.data),
        "flips": bool(config.data.get("random_flip", False)),
        "num_examples": num_examples,
        "latent_shape": list(latent_shape),
        "dtype": dtype,
        "encoded": num_examples,
    }


def data_fields(data_config: Any) -> dict[str, Any]:
    """The `data.*` fields that decide what a cache holds."""
    from diffusion_jax.data.pipeline import example_shape  # pipeline imports this module

    return {"name": data_config.get("name"), "split": data_config.get("split") or "train",
            "image_size": example_shape(data_config)[0]}


def read_meta(directory: str | Path) -> dict[str, Any] | None:
    """meta.json of a cache directory, or None if there is none."""
    path = Path(directory).expanduser() / META
    return json.loads(path.read_text()) if path.exists() else None


def write_meta(directory: Path, meta: dict[str, Any]) -> None:
    """Atomically: a reader or a resumed writer sees the old meta.json or the new, never half of one."""
    tmp = directory / (META + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, directory / META)


def mismatch(saved: dict[str, Any], wanted: dict[str, Any]) -> tuple[str, Any, Any] | None:
    """The first field (as a config path) where a cache's meta differs from what is wanted, with both values."""
    checks = [
        ("latent.autoencoder_workdir", saved["autoencoder"]["workdir"], wanted["autoencoder"]["workdir"]),
        ("latent.autoencoder_workdir (its checkpoint step)", saved["autoencoder"]["step"],
         wanted["autoencoder"]["step"]),
        *((f"data.{k}", saved["data"].get(k), v) for k, v in wanted["data"].items()),
        ("data.random_flip", saved["flips"], wanted["flips"]),
        ("latent shape", saved["latent_shape"], wanted["latent_shape"]),
    ]
    for field, have, want in checks:
        if have != want:
            return field, have, want
    return None


def open_cache(
    directory: str | Path, config: Any, autoencoder_workdir: str, autoencoder_step: int,
    latent_shape: tuple[int, int, int],
) -> LatentCache:
    """Opens `latent.cache_dir` for `config`'s run, checking that it holds what the run would encode.

    One-line ConfigErrors name `latent.cache_dir` for a missing or unfinished cache (with the command
    that writes or finishes it) and the field that differs for a cache of other data or another
    autoencoder. A cache written with flips serves a run without them (it reads the unflipped rows).
    """
    directory = Path(directory).expanduser()
    meta = read_meta(directory)
    if meta is None:
        raise ConfigError(f"latent.cache_dir: no latent cache at {directory} (no {META}); write it with: "
                          + WRITE_COMMAND.format(out=directory))
    if meta.get("format") != FORMAT:
        raise ConfigError(f"latent.cache_dir: {directory} has cache format {meta.get('format')!r}; this version "
                          f"reads format {FORMAT}; write it again with: " + WRITE_COMMAND.format(out=directory))
    if meta["encoded"] < meta["num_examples"]:
        raise ConfigError(f"latent.cache_dir: {directory} is unfinished ({meta['encoded']} of "
                          f"{meta['num_examples']} examples encoded); finish it by running its command again: "
                          + WRITE_COMMAND.format(out=directory))
    wanted = expected_meta(config, autoencoder_workdir, autoencoder_step, meta["num_examples"], latent_shape,
                           meta["dtype"])
    if meta["flips"] and not wanted["flips"]:
        wanted["flips"] = True  # the unflipped rows serve a run without flips
    different = mismatch(meta, wanted)
    if different is not None:
        field, have, want = different
        raise ConfigError(f"{field}: the latent cache at {directory} holds {have!r}, this run has {want!r}; "
                          f"write a cache for this run with: " + WRITE_COMMAND.format(out="NEW_DIR"))
    levels = directory / CAPTION_LEVELS
    return LatentCache(
        directory=directory,
        moments=np.load(directory / MOMENTS, mmap_mode="r"),
        labels=np.load(directory / LABELS),
        caption_levels=np.load(levels) if levels.exists() else None,
        meta=meta,
    )
