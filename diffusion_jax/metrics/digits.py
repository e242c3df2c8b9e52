"""An offline sample-quality metric for the embedded 8×8 digits: a small classifier shipped with the package.

The Inception network of FID knows nothing of 8×8 greyscale digits, so digits samples are
scored in the feature space of `DigitsClassifier`, a small CNN trained on the digits
train split by `python -m diffusion_jax.metrics.train_digits_classifier`, which writes its
weights, the train split's feature statistics and its test accuracy to the package file
`digits_classifier.npz`. Three numbers come from it:

- digits-FID (`digits_fid`): the Fréchet distance (`stats.frechet_distance`) between
  Gaussians fitted to the classifier's feature layer (the 64 pre-activations of the
  dense layer before the logits) for the samples and for the reference, by default the
  1,500-image train split, whose statistics ship with the weights.
- an Inception-Score analogue (`digits_inception_score`): exp E_x KL(p(y|x) || p(y)) from
  the classifier's 10 logits (`stats.inception_score`); between 1 and 10, highest for
  confident and class-balanced samples.
- class accuracy (`class_accuracy`): how often the classifier names the class a
  conditional sample was asked for;
- class entropy (`class_entropy`): the entropy of the predicted classes' histogram, ln 10 for
  samples spread evenly over the ten digits.

Inputs are batches [N, S, S, 1] of square greyscale images of any side S >= 8, either
uint8 in 0..255 (the `samples_<step>.npz` layout) or float in [-1, 1] (what samplers
return; values outside are clipped). They are brought to the classifier's native 8×8 by
the least-squares inverse of the data pipeline's upsampling: the pipeline makes S×S
digits with PIL's bilinear resize of the 8×8 originals, a linear map U [S, 8] per axis,
and images are mapped back by its pseudo-inverse D = (UᵀU)⁻¹Uᵀ [8, S] on each axis
(x₈ = D x Dᵀ, then clipped to [-1, 1]). D U = I, so the pipeline's own S×S images come
back to the originals to within PIL's rounding (±1 grey level); area averaging would
instead blur every image by the kernel [1/8, 3/4, 1/8] at S = 16 and put a floor under
the FID of a perfect model. Rows of D sum to 1, so the map commutes with the uint8 ->
[-1, 1] rescaling. S = 8 is left as is.

Protocol. FID estimated from N samples is biased upwards by O(1/N), so digits-FID values
are comparable only at equal N (and equal reference): report N with every number. We
recommend N = 1,500 samples, the size of the train reference. The real-data yardstick is
the 297-image test split, which scores `DigitsEvaluator.metadata['test_fid']` (9.2 for
`digits-cnn-1`) at N = 297; to set a model beside it, evaluate the model at N = 297 too.
(Random 297-image subsets of the train split itself score 2-3, and Gaussian noise about
340: the classifier has fitted its train split, so held-out real digits sit above it.)
The Inception Score analogue uses one split by default: with 10 splits of 30 the
marginal p(y) is too noisy, and the test split scores 8.2 instead of 9.2.

Everything is deterministic: the forward pass runs in float32 in fixed batches of
`BATCH_SIZE` (the last one zero-padded), so it compiles once whatever N and S are.
"""

import functools
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import BinaryIO

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from diffusion_jax.metrics import stats

NATIVE_SIZE = 8  # side of the classifier's input, the digits' own resolution
NUM_CLASSES = 10
FEATURE_DIM = 64  # width of the feature layer that digits-FID uses
SPATIAL_FEATURE_DIM = 32  # width of `DigitsClassifier.spatial_features`, the third conv layer's 4x4 map
BATCH_SIZE = 256  # rows per compiled forward pass
WEIGHTS_FILE = "digits_classifier.npz"
VERSION = "digits-cnn-1"  # bump when the architecture, preprocessing or training changes

_PARAM_PREFIX = "params/"
_METADATA_KEYS = ("version", "seed", "steps", "batch_size", "learning_rate", "train_accuracy", "test_accuracy",
                  "test_fid")


class DigitsClassifier(nnx.Module):
    """A small CNN for 8×8 digits: x float32 [B, 8, 8, 1] in [-1, 1] -> logits [B, 10].

    conv 3×3 (16) -> ReLU -> conv 3×3 (32) -> ReLU -> 2×2 average pool -> conv 3×3 (32) -> ReLU
    -> 2×2 average pool -> flatten [B, 128] -> dense 64 (the feature layer) -> ReLU -> dense 10;
    22,954 parameters. The features are the dense layer's pre-activations: after the ReLU, a
    third of the units are zero on every training image and would carry nothing.
    """

    def __init__(self, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 16, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(16, 32, (3, 3), rngs=rngs)
        self.conv3 = nnx.Conv(32, 32, (3, 3), rngs=rngs)
        self.hidden = nnx.Linear(2 * 2 * 32, FEATURE_DIM, rngs=rngs)
        self.head = nnx.Linear(FEATURE_DIM, NUM_CLASSES, rngs=rngs)

    def spatial_features(self, x: jax.Array) -> jax.Array:
        """The last conv layer's map: x [B, 8, 8, 1] -> [B, 4, 4, SPATIAL_FEATURE_DIM] (after its ReLU; REPA's
        patch features, `diffusion_jax.repa`)."""
        h = jax.nn.relu(self.conv2(jax.nn.relu(self.conv1(x))))  # [B, 8, 8, 32]
        h = nnx.avg_pool(h, (2, 2), strides=(2, 2))  # [B, 4, 4, 32]
        return jax.nn.relu(self.conv3(h))  # [B, 4, 4, 32]

    def features(self, x: jax.Array) -> jax.Array:
        """The feature layer: x [B, 8, 8, 1] -> [B, FEATURE_DIM] (pre-activations of the hidden dense layer)."""
        h = nnx.avg_pool(self.spatial_features(x), (2, 2), strides=(2, 2))  # [B, 2, 2, 32]
        return self.hidden(h.reshape(h.shape[0], -1))

    def __call__(self, x: jax.Array) -> jax.Array:
        """Logits [B, 10] of x [B, 8, 8, 1]."""
        return self.logits_from_features(self.features(x))

    def logits_from_features(self, features: jax.Array) -> jax.Array:
        """Logits [B, 10] from the feature layer [B, FEATURE_DIM]."""
        return self.head(jax.nn.relu(features))


def _flatten(nested: Mapping, prefix: str = "") -> dict[str, object]:
    """{'a': {'b': leaf}} -> {'a/b': leaf}."""
    flat = {}
    for name, value in nested.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{name}/"))
        else:
            flat[f"{prefix}{name}"] = value
    return flat


def flat_params(model: DigitsClassifier) -> dict[str, np.ndarray]:
    """The model's parameters as {'conv1/kernel': array, ...}, the names used in the weights file."""
    return {name: np.asarray(value) for name, value in _flatten(nnx.state(model, nnx.Param).to_pure_dict()).items()}


def model_from_flat(flat: Mapping[str, np.ndarray], source: str = "parameters") -> DigitsClassifier:
    """A `DigitsClassifier` holding `flat` (names as `flat_params`).

    Raises:
        ValueError: naming `source` if the names or shapes differ from the classifier's.
    """
    abstract = nnx.eval_shape(lambda: DigitsClassifier(rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract, nnx.Param)
    expected = {name: tuple(v.shape) for name, v in _flatten(state.to_pure_dict()).items()}
    got = {name: np.shape(v) for name, v in flat.items()}
    if got != expected:
        raise ValueError(
            f"{source}: parameters do not match DigitsClassifier {VERSION}: expected {expected}, got {got}"
        )
    nested: dict = {}
    for name, value in flat.items():
        *parents, leaf = name.split("/")
        node = nested
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = jnp.asarray(value, jnp.float32)
    nnx.replace_by_pure_dict(state, nested)
    return nnx.merge(graphdef, state)


@functools.lru_cache(maxsize=16)
def upsampling_matrix(size: int) -> np.ndarray:
    """U [size, 8]: PIL's bilinear resize from 8 to `size` pixels along one axis (the pipeline's `_resize`).

    Column j is the resize of the unit impulse at j (PIL's float mode, so without its
    8-bit rounding); bilinear resizing is separable, so an 8×8 image x becomes U x Uᵀ.
    """
    columns = []
    for j in range(NATIVE_SIZE):
        impulse = np.zeros((1, NATIVE_SIZE), np.float32)
        impulse[0, j] = 1.0
        row = Image.fromarray(impulse, mode="F").resize((size, 1), Image.Resampling.BILINEAR)
        columns.append(np.asarray(row, np.float64)[0])
    return np.stack(columns, axis=1)


@functools.lru_cache(maxsize=16)
def downsampling_matrix(size: int) -> np.ndarray:
    """D [8, size] = pinv(U): the least-squares inverse of the pipeline's bilinear 8 -> `size` upsampling."""
    return np.linalg.pinv(upsampling_matrix(size)).astype(np.float32)


def _check_images(images: np.ndarray) -> None:
    if images.ndim != 4 or images.shape[-1] != 1 or images.shape[1] != images.shape[2]:
        raise ValueError(
            f"images: need square greyscale images [N, S, S, 1] (one channel), got shape {images.shape}"
        )
    if images.shape[1] < NATIVE_SIZE:
        raise ValueError(
            f"images: the side S must be at least {NATIVE_SIZE} (the digits' own size; the pipeline's "
            f"data.image_size >= {NATIVE_SIZE}), got S={images.shape[1]}"
        )
    if images.dtype != np.uint8 and not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(
            f"images: dtype must be uint8 (0..255) or a float type (values in [-1, 1]), got {images.dtype}"
        )
    if images.shape[0] == 0:
        raise ValueError("images: need at least one image, got N=0")
    if images.dtype != np.uint8 and not np.all(np.isfinite(images.astype(np.float32))):
        raise ValueError(f"images: {np.sum(~np.isfinite(images.astype(np.float32)))} values are NaN or infinite")


def to_native(images: np.ndarray | jax.Array) -> np.ndarray:
    """Images [N, S, S, 1] (uint8 0..255 or float in [-1, 1]) -> float32 [N, 8, 8, 1] in [-1, 1].

    uint8 maps to v / 127.5 - 1 (as the pipeline does), floats are clipped to [-1, 1];
    S > 8 is then mapped to 8×8 by `downsampling_matrix` on each axis and clipped again.

    Raises:
        ValueError: for a shape other than [N, S, S, 1] with N >= 1 and S >= 8, another dtype,
            or non-finite values.
    """
    images = np.asarray(images)
    _check_images(images)
    if images.dtype == np.uint8:
        x = images.astype(np.float32) / 127.5 - 1.0
    else:
        x = np.clip(images.astype(np.float32), -1.0, 1.0)
    return downsample_to_native(x)


def downsample_to_native(x: np.ndarray | jax.Array) -> np.ndarray | jax.Array:
    """Float images [N, S, S, 1] in [-1, 1] -> [N, 8, 8, 1]: `downsampling_matrix` on each axis, clipped to
    [-1, 1]; unchanged at S = 8. NumPy in, NumPy out; JAX in (traceable), JAX out."""
    size = x.shape[1]
    if size == NATIVE_SIZE:
        return x
    xp = jnp if isinstance(x, jax.Array) else np
    down = xp.asarray(downsampling_matrix(size))  # [8, S]
    return xp.clip(xp.einsum("ih,nhwc,jw->nijc", down, x, down), -1.0, 1.0)  # [N, 8, 8, 1]


class DigitsEvaluator:
    """The trained `DigitsClassifier` with its reference statistics: features, logits and the three metrics.

    Attributes:
        reference: the default FID reference, `FeatureStats` of the train split's features (N = 1,500)
            for the shipped weights; None for a classifier without one (then `fid` needs `reference`).
        metadata: what the training script recorded: version, seed, steps, batch_size,
            learning_rate, train_accuracy, test_accuracy and test_fid (test split vs reference).
    """

    def __init__(
        self,
        model: DigitsClassifier,
        reference: stats.FeatureStats | None = None,
        metadata: Mapping[str, object] | None = None,
    ):
        self.reference = reference
        self.metadata = dict(metadata or {})
        graphdef, params = nnx.split(model, nnx.Param)
        self._graphdef, self._params = graphdef, params

        @jax.jit
        def forward(params: nnx.State, x: jax.Array) -> tuple[jax.Array, jax.Array]:
            net = nnx.merge(graphdef, params)
            features = net.features(x)  # [B, F]
            return features, net.logits_from_features(features)  # [B, F], [B, 10]

        self._forward = forward

    @classmethod
    def load(cls, path: str | Path | None = None) -> "DigitsEvaluator":
        """Reads a weights file written by the training script (None: the one shipped in the package).

        Raises:
            ValueError: if the file's version or parameters do not match this module's classifier.
        """
        if path is None:
            with resources.files("diffusion_jax.metrics").joinpath(WEIGHTS_FILE).open("rb") as f:
                return cls._from_npz(f, f"diffusion_jax/metrics/{WEIGHTS_FILE}")
        with open(path, "rb") as f:
            return cls._from_npz(f, str(path))

    @classmethod
    def _from_npz(cls, file: BinaryIO, source: str) -> "DigitsEvaluator":
        with np.load(file) as data:
            contents = {name: data[name] for name in data.files}
        version = str(contents.get("version", "none"))
        if version != VERSION:
            raise ValueError(f"{source}: weights version {version!r}, but this module's classifier is {VERSION!r}; "
                             "retrain with python -m diffusion_jax.metrics.train_digits_classifier")
        flat = {k[len(_PARAM_PREFIX):]: v for k, v in contents.items() if k.startswith(_PARAM_PREFIX)}
        model = model_from_flat(flat, source)
        reference = stats.FeatureStats(
            np.asarray(contents["ref_mu"], np.float64), np.asarray(contents["ref_sigma"], np.float64),
            int(contents["ref_num"]),
        )
        metadata = {k: contents[k].item() for k in _METADATA_KEYS}
        return cls(model, reference, metadata)

    def classifier(self) -> DigitsClassifier:
        """The trained classifier, a module of its own (REPA's frozen encoder)."""
        return nnx.merge(self._graphdef, self._params)

    def features_and_logits(self, images: np.ndarray | jax.Array) -> tuple[np.ndarray, np.ndarray]:
        """Feature-layer activations float32 [N, 64] and logits float32 [N, 10] of images (see `to_native`)."""
        x = to_native(images)  # [N, 8, 8, 1]
        features, logits = [], []
        for start in range(0, len(x), BATCH_SIZE):
            batch = x[start:start + BATCH_SIZE]
            padded = np.zeros((BATCH_SIZE, *batch.shape[1:]), np.float32)
            padded[:len(batch)] = batch
            f, g = self._forward(self._params, padded)
            features.append(np.asarray(f)[:len(batch)])
            logits.append(np.asarray(g)[:len(batch)])
        return np.concatenate(features), np.concatenate(logits)

    def features(self, images: np.ndarray | jax.Array) -> np.ndarray:
        """The feature layer float32 [N, 64] of images [N, S, S, 1] (uint8 or float in [-1, 1])."""
        return self.features_and_logits(images)[0]

    def logits(self, images: np.ndarray | jax.Array) -> np.ndarray:
        """Class logits float32 [N, 10] of images [N, S, S, 1] (uint8 or float in [-1, 1])."""
        return self.features_and_logits(images)[1]

    def fid(self, images: np.ndarray | jax.Array, reference: stats.FeatureStats | None = None) -> float:
        """digits-FID of images [N >= 2, S, S, 1] against `reference` (None: `self.reference`, the train split).

        Raises:
            ValueError: if there is no reference (neither argument nor `self.reference`).
        """
        reference = reference if reference is not None else self.reference
        if reference is None:
            raise ValueError("reference: this evaluator has no reference statistics; pass reference=FeatureStats(...)")
        return stats.fid_from_stats(stats.feature_stats(self.features(images)), reference)

    def inception_score(self, images: np.ndarray | jax.Array, num_splits: int = 1) -> float:
        """The Inception-Score analogue exp E KL(p(y|x) || p(y)) in [1, 10]: the mean over `num_splits` splits."""
        return stats.inception_score(self.logits(images), num_splits)[0]

    def class_entropy(self, images: np.ndarray | jax.Array) -> float:
        """The entropy in nats of the predicted classes' histogram, in [0, ln 10 = 2.303]: how evenly samples
        cover the ten digits (a sampler that collapses onto a few modes scores low)."""
        counts = np.bincount(np.argmax(self.logits(images), axis=1), minlength=NUM_CLASSES)
        p = counts[counts > 0] / counts.sum()
        return float(-np.sum(p * np.log(p)))

    def class_accuracy(self, images: np.ndarray | jax.Array, labels: np.ndarray | jax.Array) -> float:
        """The fraction of images [N, S, S, 1] whose predicted class equals `labels` (int [N], 0..9)."""
        predicted = np.argmax(self.logits(images), axis=1)  # [N]
        labels = np.asarray(labels)
        if labels.shape != predicted.shape or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels: need integer class labels [N] for N={len(predicted)} images, "
                             f"got {labels.dtype} {labels.shape}")
        if labels.min() < 0 or labels.max() >= NUM_CLASSES:
            raise ValueError(f"labels: classes are 0..{NUM_CLASSES - 1}, got values {labels.min()}..{labels.max()}")
        return float(np.mean(predicted == labels))


@functools.lru_cache(maxsize=1)
def default_evaluator() -> DigitsEvaluator:
    """The evaluator with the package's shipped weights, loaded once per process."""
    return DigitsEvaluator.load()


def digits_fid(images: np.ndarray | jax.Array, reference: stats.FeatureStats | None = None) -> float:
    """digits-FID of images [N, S, S, 1] (uint8 or float in [-1, 1]) against `reference` (None: train split)."""
    return default_evaluator().fid(images, reference)


def digits_inception_score(images: np.ndarray | jax.Array, num_splits: int = 1) -> float:
    """The Inception-Score analogue of images [N, S, S, 1] from the shipped classifier's logits."""
    return default_evaluator().inception_score(images, num_splits)


def class_accuracy(images: np.ndarray | jax.Array, labels: np.ndarray | jax.Array) -> float:
    """The fraction of images [N, S, S, 1] that the shipped classifier assigns to their `labels` [N]."""
    return default_evaluator().class_accuracy(images, labels)


def main(argv: list[str] | None = None) -> None:
    """`python -m diffusion_jax.metrics.digits FILE.npz ...`: one JSON line per file of samples (`arr_0` uint8
    [N, S, S, 1], as `samples_<step>.npz`) with its digits-FID, IS analogue and class entropy at its N, e.g.
    for samples that eval mode does not draw itself, such as a cascade's (`sample.low_res_workdir`)."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("files", nargs="+")
    evaluator = default_evaluator()
    for path in parser.parse_args(argv).files:
        with np.load(path) as archive:
            images = archive["arr_0"]
        print(json.dumps({"file": path, "num_samples": len(images), "classifier": VERSION,
                          "digits_fid": evaluator.fid(images), "digits_is": evaluator.inception_score(images),
                          "digits_class_entropy": evaluator.class_entropy(images)}))


if __name__ == "__main__":
    main()
