"""Inception features of whole image sets, and FID reference statistics from them.

FID (Heusel et al. 2017, arXiv 1706.08500) compares the Gaussian fitted to the Inception pool3
features of generated images with that of the data; the data's (mu, sigma) are computed once and
stored (`stats.save_stats`, the layout of pytorch-fid and of the ADM evaluator's reference
batches). The distances themselves are in `metrics.stats`.
"""

import time
from collections.abc import Iterable, Iterator

import jax
import numpy as np
from absl import logging

from diffusion_jax.metrics.inception import NUM_CLASSES, POOL_DIM, InceptionFeatures
from diffusion_jax.metrics.stats import FeatureStats, feature_stats

ImageSource = np.ndarray | jax.Array | Iterable[np.ndarray]

_LOG_EVERY_S = 30.0


def _rebatch(images: ImageSource, size: int) -> Iterator[np.ndarray]:
    """Regroups an array [N, H, W, C] or an iterable of such batches into batches of exactly `size`
    images (the last one smaller), so the extractor pads at most once."""
    batches = [images] if isinstance(images, np.ndarray | jax.Array) else images
    buffer: list[np.ndarray] = []
    count, shape = 0, None
    for batch in batches:
        batch = np.asarray(batch)
        if batch.ndim != 4:
            raise ValueError(f"images: expected batches [B, H, W, C], got shape {batch.shape}")
        if shape is None:
            shape = batch.shape[1:]
        elif batch.shape[1:] != shape:
            raise ValueError(f"images: all batches must share [H, W, C]; got {batch.shape[1:]} after {shape}")
        buffer.append(batch)
        count += len(batch)
        while count >= size:
            joined = np.concatenate(buffer)
            yield joined[:size]
            buffer, count = [joined[size:]], count - size
    if count:
        yield np.concatenate(buffer)


def compute_features(images: ImageSource, extractor: InceptionFeatures) -> tuple[np.ndarray, np.ndarray]:
    """pool3 features [N, 2048] and logits [N, 1008] (float32) of every image.

    `images`: uint8 [N, H, W, C] (or float in [0, 1]; C = 1 or 3), or an iterable of such batches of
    any sizes, e.g. a data loader. Logs progress every 30 s.
    """
    pools, logits = [np.zeros((0, POOL_DIM), np.float32)], [np.zeros((0, NUM_CLASSES), np.float32)]
    done, started = 0, time.perf_counter()
    last_log = started
    for batch in _rebatch(images, extractor.batch_size):
        pool, logit = extractor(batch)
        pools.append(pool)
        logits.append(logit)
        done += len(batch)
        if time.perf_counter() - last_log > _LOG_EVERY_S:
            last_log = time.perf_counter()
            logging.info("Inception features: %d images, %.1f images/s", done, done / (last_log - started))
    return np.concatenate(pools), np.concatenate(logits)


def reference_stats(images: ImageSource, extractor: InceptionFeatures) -> FeatureStats:
    """FID statistics (mean [2048], covariance [2048, 2048], count) of the pool3 features of `images`
    (an array or an iterable of batches, as in `compute_features`). Save them with `stats.save_stats`."""
    pool, _ = compute_features(images, extractor)
    return feature_stats(pool)
