"""A tensorflow-datasets builder for scikit-learn's bundled 8×8 handwritten digits.

The 1,797 images ship inside scikit-learn (`sklearn.datasets.load_digits`, the test
part of UCI "Optical Recognition of Handwritten Digits"), so preparing this dataset
needs no network and no TensorFlow: the image is a `Tensor` feature (not `Image`,
whose PNG encoding needs TensorFlow) written as array_record, which
`tfds.data_source` reads back.

Splits: a fixed permutation of the 1,797 scikit-learn indices,
`np.random.default_rng(0).permutation(1797)`; its first 1,500 entries are `train`
and the remaining 297 are `test`, stored in that order.
"""

import numpy as np
import tensorflow_datasets as tfds
from sklearn.datasets import load_digits

NUM_TRAIN = 1500
SPLIT_SEED = 0


class Digits(tfds.core.GeneratorBasedBuilder):
    """8×8 greyscale digits 0..9; `image` uint8 [8, 8, 1] = round(v·255/16) for v in 0..16."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: 1,500 train / 297 test, seed-0 permutation."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://archive.ics.uci.edu/dataset/80",
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        del dl_manager  # The data ships with scikit-learn.
        digits = load_digits()
        images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
        order = np.random.default_rng(SPLIT_SEED).permutation(len(images))
        return {
            "train": self._generate_examples(images, digits.target, order[:NUM_TRAIN]),
            "test": self._generate_examples(images, digits.target, order[NUM_TRAIN:]),
        }

    def _generate_examples(self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray):
        # Keys are positions in the split (tfds stores the examples in key order), so
        # example k of a split is scikit-learn's example indices[k].
        for key, i in enumerate(indices):
            yield key, {"image": images[i], "label": int(labels[i])}


def prepare_digits(data_dir: str | None = None) -> Digits:
    """Digits' builder in `data_dir` (None: the tfds default), prepared there if it is not yet.

    Preparing writes about 0.5 MB in a fraction of a second, offline; when the
    dataset is already prepared this only reads its metadata.
    """
    builder = Digits(data_dir=data_dir, file_format="array_record")
    if not builder.is_prepared():
        builder.download_and_prepare()
    return builder
