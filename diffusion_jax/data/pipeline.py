"""The input pipeline: global batches placed on the mesh, in an order fixed by (seed, step).

`create_iterator` yields `{'image': float32 [B, ...] in [-1, 1], 'label': int32 [B]}`
as `jax.Array`s sharded over the batch axis. Each process builds only the rows its
devices hold. The batch at step s is a pure function of (seed, s), the same for
any number of processes or devices, so a run resumed with `start_step=s` sees
exactly the batches the interrupted run would have seen.

Image datasets are read once through `tfds.data_source` (array_record, no
TensorFlow), decoded and resized into memory; global batch s holds positions
[s·B, (s+1)·B) of an endless stream that visits the split in a fresh random order
every epoch, gathered in one vectorised step. (grain's per-example `MapDataset`
chain source → shuffle → repeat → map → batch measured 4-7k examples/s on digits,
about 30 µs of Python per example; this design measured 250-330k.) A grain thread
builds the batches ahead of the training loop.
Toy 2-D datasets sample each step's batch from a generator seeded by (seed, step).

Config fields (`data.*`, all optional except `name`):
  name          'digits' | 'cifar10' | 'imagenet2012' | 'swiss_roll' | 'eight_gaussians' | 'two_moons'
  image_size    side of the square images after resizing (default: the dataset's own,
                16 for digits, 32 for cifar10); resizing is PIL bilinear on uint8,
                so the data stay on the 256-level grid that bits/dim assumes
  data_dir      tfds data directory (default None: $TFDS_DATA_DIR or ~/tensorflow_datasets)
  split         tfds split to read (default 'train'; slices such as 'train[:90%]' work)
  random_flip   random horizontal flips, a function of (seed, step, row) (default False)
  captions      digits only: add `tokens` int32 [B, L] and `token_mask` bool [B, L], a caption of each
                image composed from its label and its measured thickness and slant
                (`data.captions`), drawn anew at every step as a function of (seed, step, row)
  num_threads   grain threads building batches (default 1)
  prefetch      batches built ahead (default 4)
"""

import dataclasses
import functools
import itertools
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds
from jax.sharding import NamedSharding, PartitionSpec
from PIL import Image

from diffusion_jax.data import captions, toy
from diffusion_jax.data.digits import prepare_digits
from diffusion_jax.data.latent_cache import LatentCache
from diffusion_jax.errors import ConfigError
from diffusion_jax.registry import Registry

PREPARE_COMMAND = (
    "pip install 'diffusion-jax[tf]' && python -m diffusion_jax.data.prepare --dataset={name} --data_dir={data_dir}"
)


@dataclasses.dataclass(frozen=True)
class ImageDataset:
    """An image dataset read through tfds: how to open it and what its examples are."""

    open: Callable[[str, str], Sequence[dict[str, Any]]]  # (data_dir, split) -> source
    image_size: int  # default side of the square images (data.image_size)
    channels: int
    num_classes: int
    center_crop: bool = False  # images of any aspect: ADM's centre crop (`_center_crop`), not a squashing resize


@dataclasses.dataclass(frozen=True)
class ToyDataset:
    """A 2-D toy distribution: `sample(rng, n)` returns float32 points [n, 2]."""

    sample: Callable[[np.random.Generator, int], np.ndarray]


# Stream tags: independent random streams drawn from one seed.
_SHUFFLE, _FLIP, _TOY, _CAPTION = 0, 1, 2, 3

DATASETS: Registry[ImageDataset | ToyDataset] = Registry("dataset", "data.name")


class DatasetNotPreparedError(ConfigError):
    """A tfds dataset has no array_record copy in `data.data_dir`."""


def _open_digits(data_dir: str, split: str) -> Sequence[dict[str, Any]]:
    return prepare_digits(data_dir).as_data_source(split)


def _open_tfds(name: str) -> Callable[[str, str], Sequence[dict[str, Any]]]:
    """Opener for a tfds dataset that the user prepares (`prepare.py`); never downloads."""

    def open_source(data_dir: str, split: str) -> Sequence[dict[str, Any]]:
        try:
            return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except (AssertionError, NotImplementedError):  # not prepared / not array_record
            raise DatasetNotPreparedError(
                f"data.name={name!r}: no array_record copy of {name} in "
                f"data.data_dir={data_dir!r}; prepare it with: " + PREPARE_COMMAND.format(name=name, data_dir=data_dir)
            ) from None

    return open_source


# Digits are stored at 8×8; they are upsampled to 16×16 by default.
DATASETS.register("digits")(ImageDataset(_open_digits, image_size=16, channels=1, num_classes=10))
DATASETS.register("cifar10")(ImageDataset(_open_tfds("cifar10"), image_size=32, channels=3, num_classes=10))
# ImageNet (tfds needs the ILSVRC2012 tar files placed by hand; `prepare.py`): 1.28M images too many
# to hold as pixels, so latent runs read it from a cache (`encode_latents`), which streams it once.
DATASETS.register("imagenet2012")(
    ImageDataset(_open_tfds("imagenet2012"), image_size=256, channels=3, num_classes=1000, center_crop=True)
)
for _name in toy.DISTRIBUTIONS:
    DATASETS.register(_name)(ToyDataset(toy.DISTRIBUTIONS.get(_name)))


def _image_size(data_config: Any, dataset: ImageDataset) -> int:
    size = data_config.get("image_size") or dataset.image_size
    if size <= 0:
        raise ConfigError(f"data.image_size must be positive, got {size}")
    return size


def example_shape(data_config: Any) -> tuple[int, ...]:
    """Shape of one example of `data_config.name` after preprocessing, e.g. (16, 16, 1)."""
    dataset = DATASETS.get(data_config.get("name"))
    if isinstance(dataset, ToyDataset):
        return (2,)
    size = _image_size(data_config, dataset)
    return (size, size, dataset.channels)


def num_classes(data_config: Any) -> int:
    """Number of label classes of `data_config.name`; 0 for the unlabelled toy data."""
    dataset = DATASETS.get(data_config.get("name"))
    return 0 if isinstance(dataset, ToyDataset) else dataset.num_classes


def load_split(data_config: Any, split: str) -> tuple[np.ndarray, np.ndarray]:
    """A whole split of an image dataset at `data.image_size`, as training sees it before scaling
    to [-1, 1]: uint8 images [N, S, S, C] and int32 labels [N] (for evaluation and reference statistics)."""
    name = data_config.get("name")
    dataset = DATASETS.get(name)
    if isinstance(dataset, ToyDataset):
        raise ConfigError(f"data.name={name!r} is 2-D toy data, which has no image splits to evaluate on")
    return _load_split(dataset, data_config, split)


def data_dir(data_config: Any) -> str:
    """`data.data_dir`, or tfds' default: $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
    return os.path.expanduser(data_config.get("data_dir") or tfds.core.constants.DATA_DIR)


def _batch_rows(sharding: NamedSharding, global_batch_size: int) -> tuple[NamedSharding, int, int]:
    """Validates the batch size against the mesh; returns the batch sharding and local rows.

    The rows [start, stop) of every global batch are those that this process's devices
    hold, read from the sharding rather than assumed from `jax.process_index()`.
    """
    spec = sharding.spec[0] if len(sharding.spec) else None
    batch_sharding = NamedSharding(sharding.mesh, PartitionSpec(spec))
    axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
    num_shards = math.prod(sharding.mesh.shape[a] for a in axes)
    if global_batch_size <= 0:
        raise ConfigError(f"training.batch_size must be positive, got {global_batch_size}")
    if global_batch_size % jax.process_count():
        raise ConfigError(
            f"training.batch_size={global_batch_size} must be divisible by the number of "
            f"processes ({jax.process_count()})"
        )
    if global_batch_size % num_shards:
        raise ConfigError(
            f"training.batch_size={global_batch_size} must be divisible by the "
            f"{num_shards} devices of mesh axes {axes} that the batch is sharded over"
        )
    indices = batch_sharding.addressable_devices_indices_map((global_batch_size,)).values()
    blocks = {index[0].indices(global_batch_size)[:2] for index in indices}
    start, stop = min(b[0] for b in blocks), max(b[1] for b in blocks)
    rows = stop - start
    if sum(b - a for a, b in blocks) != rows or start % rows or global_batch_size % rows:
        raise ValueError(
            f"unsupported batch sharding {sharding.spec}: the rows of process "
            f"{jax.process_index()} are {sorted(blocks)}, not one aligned block"
        )
    return batch_sharding, start, stop


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    """PIL bilinear resize of a uint8 [H, W, C] image to [size, size, C], still uint8."""
    if image.shape[:2] == (size, size):
        return image
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    resized = np.asarray(pil.resize((size, size), Image.Resampling.BILINEAR))
    return resized.reshape(size, size, image.shape[-1])


def _center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """ADM's `center_crop_arr` (Dhariwal & Nichol 2021; DiT and LDM's ImageNet preprocessing): halve with
    box filtering while the short side is ≥ 2·size, resize bicubically to a short side of `size`, then
    crop the centre square; uint8 [H, W, C] -> [size, size, C]."""
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    while min(pil.size) >= 2 * size:
        pil = pil.resize(tuple(x // 2 for x in pil.size), Image.Resampling.BOX)
    scale = size / min(pil.size)
    pil = pil.resize(tuple(round(x * scale) for x in pil.size), Image.Resampling.BICUBIC)
    array = np.asarray(pil).reshape(pil.size[1], pil.size[0], image.shape[-1])
    top, left = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
    return array[top : top + size, left : left + size]


def open_split(data_config: Any, split: str | None = None) -> tuple[ImageDataset, Sequence[dict[str, Any]]]:
    """The image dataset of `data.name` and its split (default `data.split` or 'train') as a tfds source."""
    dataset = DATASETS.get(data_config.get("name"))
    if isinstance(dataset, ToyDataset):
        raise ConfigError(f"data.name={data_config.get('name')!r} is 2-D toy data, which has no images")
    return dataset, dataset.open(data_dir(data_config), split or data_config.get("split") or "train")


def decode_examples(
    dataset: ImageDataset, data_config: Any, source: Sequence[dict[str, Any]], indices: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Examples `indices` of `source` decoded and brought to `data.image_size`: uint8 images
    [n, S, S, C] and int32 labels [n]."""
    size = _image_size(data_config, dataset)
    fit = _center_crop if dataset.center_crop else _resize
    images = np.empty((len(indices), size, size, dataset.channels), np.uint8)
    labels = np.empty(len(indices), np.int32)
    for row, i in enumerate(indices):
        example = source[int(i)]
        images[row] = fit(np.asarray(example["image"]), size)
        labels[row] = example["label"]
    return images, labels


def _load_split(dataset: ImageDataset, data_config: Any, split: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The whole split, decoded and resized: uint8 images [N, S, S, C] and int32 labels [N]."""
    _, source = open_split(data_config, split)
    return decode_examples(dataset, data_config, source, range(len(source)))


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """The order of the examples in one epoch: a fresh permutation per (seed, epoch)."""
    return np.random.default_rng([seed, _SHUFFLE, epoch]).permutation(num_examples)


def _example_indices(seed: int, num_examples: int, positions: np.ndarray) -> np.ndarray:
    """Dataset indices of the given positions in the endless, epoch-by-epoch shuffled stream."""
    epochs, within = np.divmod(positions, num_examples)
    indices = np.empty_like(positions)
    for epoch in np.unique(epochs):
        here = epochs == epoch
        indices[here] = _epoch_permutation(seed, int(epoch), num_examples)[within[here]]
    return indices


def _caption_levels(data_config: Any, images: np.ndarray, labels: np.ndarray) -> np.ndarray | None:
    """With `data.captions`, the measured caption levels [N, P] of every image (`data.captions`)."""
    if not data_config.get("captions", False):
        return None
    if data_config.get("name") != "digits":
        raise ConfigError(f"data.captions: only the digits have captions (from their labels and measured "
                          f"thickness and slant), not data.name={data_config.get('name')!r}")
    return captions.levels(captions.measure(images), labels)


def _image_dataset(
    dataset: ImageDataset,
    data_config: Any,
    seed: int,
    start_step: int,
    global_batch_size: int,
    start: int,
    stop: int,
    cache: LatentCache | None = None,
) -> grain.IterDataset:
    """This process's rows [start, stop) of the global batches from `start_step` on.

    Global batch s holds stream positions [s·B, (s+1)·B) of the example stream, which
    visits the split (held in memory, or memory-mapped from a latent `cache`) in a new
    random order every epoch; each batch is one vectorised gather. Flips are drawn for the
    whole global batch from default_rng([seed, 1, s]), so an example's flip depends on
    (seed, step, row) only; from a cache, a flip reads the mirrored image's moments.
    grain runs the steps in a reader thread and keeps `data.prefetch` batches ready.
    """
    if cache is None:
        images, labels = _load_split(dataset, data_config)
        caption_levels = _caption_levels(data_config, images, labels)
    else:
        images, labels, caption_levels = cache.moments, cache.labels, cache.caption_levels
        if data_config.get("captions", False) and caption_levels is None:
            raise ConfigError(f"data.captions: the latent cache at {cache.directory} has no caption levels "
                              f"(only digits caches do)")
    random_flip = data_config.get("random_flip", False)
    rows = np.arange(start, stop)

    def make_batch(step: int) -> dict[str, np.ndarray]:
        indices = _example_indices(seed, len(images), step * global_batch_size + rows)
        flip = np.zeros(stop - start, bool)
        if random_flip:
            flip_rng = np.random.default_rng([seed, _FLIP, step])
            flip = flip_rng.random(global_batch_size)[start:stop] < 0.5
        if cache is None:
            image = images[indices]
            image[flip] = image[flip, :, ::-1]
            batch = {"image": image.astype(np.float32) / 127.5 - 1.0, "label": labels[indices]}
        else:
            order = np.argsort(indices, kind="stable")  # a memmap reads sorted rows fastest
            moments = np.empty((len(indices), *images.shape[2:]), np.float32)
            moments[order] = images[indices[order], flip[order].astype(np.intp)]
            batch = {"moments": moments, "label": labels[indices]}
        if caption_levels is not None:
            texts = [
                captions.caption(int(labels[i]), caption_levels[i], np.random.default_rng([seed, _CAPTION, step, row]))
                for i, row in zip(indices, rows, strict=True)
            ]
            batch["tokens"], batch["token_mask"] = captions.vocabulary().encode(texts, captions.max_caption_length())
        return batch

    steps = grain.MapDataset.range(start_step, sys.maxsize)
    return steps.map(make_batch).to_iter_dataset(
        grain.ReadOptions(
            num_threads=data_config.get("num_threads", 1), prefetch_buffer_size=data_config.get("prefetch", 4)
        )
    )


def _toy_batches(
    dataset: ToyDataset,
    seed: int,
    start_step: int,
    global_batch_size: int,
    start: int,
    stop: int,
) -> Iterator[dict[str, np.ndarray]]:
    """Rows [start, stop) of global batches sampled with default_rng([seed, 2, step])."""
    for step in itertools.count(start_step):
        points = dataset.sample(np.random.default_rng([seed, _TOY, step]), global_batch_size)
        yield {"image": points[start:stop], "label": np.zeros(stop - start, np.int32)}


def _pair_batches(
    pairs: dict[str, np.ndarray], seed: int, start_step: int, global_batch_size: int, start: int, stop: int
) -> Iterator[dict[str, np.ndarray]]:
    """Rows [start, stop) of global batches of reflow pairs, in the same epoch-shuffled order as images."""
    rows = np.arange(start, stop)
    for step in itertools.count(start_step):
        indices = _example_indices(seed, len(pairs["label"]), step * global_batch_size + rows)
        order = np.argsort(indices, kind="stable")  # a memmap reads sorted rows fastest
        batch = {}
        for key in ("image", "noise"):
            batch[key] = np.empty((len(indices), *pairs[key].shape[1:]), np.float32)
            batch[key][order] = pairs[key][indices[order]]
        batch["label"] = np.asarray(pairs["label"][indices], np.int32)
        yield batch


def create_iterator(
    data_config: Any,
    *,
    global_batch_size: int,
    seed: int,
    start_step: int = 0,
    sharding: NamedSharding,
    latent_cache: LatentCache | None = None,
    pairs: dict[str, np.ndarray] | None = None,
) -> Iterator[dict[str, jax.Array]]:
    """Global batches for steps `start_step`, `start_step + 1`, ... (an endless iterator).

    Args:
      data_config: the `data` ConfigDict (fields in the module docstring).
      global_batch_size: B, the batch size summed over all processes.
      seed: non-negative; with the step it fixes each batch's examples and flips.
      start_step: the step of the first batch; resuming a run passes its restored step.
      sharding: where batches go; only its batch-axis entry (e.g. P('data')) is used.
      latent_cache: an opened `latent.cache_dir` (`latent_cache.open_cache`): the same examples
        and flips, read as latent moments instead of decoded pixels.
      pairs: reflow's (noise, sample) pairs (`reflow.open_pairs`) to draw instead of the dataset:
        'image' is a pair's sample, 'noise' its noise.

    Yields:
      {'image': float32 [B, *example_shape(data_config)] in [-1, 1] for images
      (2-D points for toy data), 'label': int32 [B] (zeros for toy data)}, each a
      `jax.Array` sharded over the batch axis; from a latent cache 'moments' float32
      [B, h, w, 2c] (mean, then logvar of q(z|x)) in place of 'image'.
    """
    dataset = DATASETS.get(data_config.get("name"))
    if seed < 0:
        raise ConfigError(f"seed must be non-negative, got {seed}")
    if start_step < 0:
        raise ValueError(f"start_step must be non-negative, got {start_step}")
    batch_sharding, start, stop = _batch_rows(sharding, global_batch_size)
    if pairs is not None:
        local = _pair_batches(pairs, seed, start_step, global_batch_size, start, stop)
    elif isinstance(dataset, ToyDataset):
        local = _toy_batches(dataset, seed, start_step, global_batch_size, start, stop)
    else:
        local = _image_dataset(dataset, data_config, seed, start_step, global_batch_size, start, stop, latent_cache)
    return _to_global(local, batch_sharding, global_batch_size)


def _to_global(
    local: Iterator[dict[str, np.ndarray]] | grain.IterDataset,
    sharding: NamedSharding,
    global_batch_size: int,
) -> Iterator[dict[str, jax.Array]]:
    for batch in local:
        yield {
            k: jax.make_array_from_process_local_data(sharding, v, (global_batch_size, *v.shape[1:]))
            for k, v in batch.items()
        }
