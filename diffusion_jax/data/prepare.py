"""Prepares an image dataset as array_record so that the pipeline can read it offline.

    python -m diffusion_jax.data.prepare --dataset=cifar10 --data_dir=DIR

Digits needs nothing else (and is also prepared on first use). Other tfds datasets
download here, and tfds encodes their images with TensorFlow, so preparing them
needs `pip install 'diffusion-jax[tf]'`; reading them back does not.
"""

import argparse
import importlib.util

import tensorflow_datasets as tfds

from diffusion_jax.data.digits import prepare_digits
from diffusion_jax.data.pipeline import DATASETS, ImageDataset, data_dir


def prepare(dataset: str, directory: str | None = None) -> str:
    """Prepares `dataset` in `directory` (None: the tfds default); returns its folder."""
    directory = data_dir({"data_dir": directory})
    if dataset == "digits":
        return str(prepare_digits(directory).data_dir)
    if importlib.util.find_spec("tensorflow") is None:
        raise SystemExit(
            f"preparing {dataset} needs TensorFlow to encode its images (reading them "
            "does not): pip install 'diffusion-jax[tf]'"
        )
    builder = tfds.builder(dataset, data_dir=directory)
    builder.download_and_prepare(file_format="array_record")
    return str(builder.data_dir)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point; `argv` excludes the program name (None: sys.argv[1:])."""
    image_datasets = [n for n in DATASETS if isinstance(DATASETS.get(n), ImageDataset)]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, choices=image_datasets)
    parser.add_argument(
        "--data_dir", default=None, help="tfds data directory (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)"
    )
    args = parser.parse_args(argv)
    print(f"{args.dataset} is ready in {prepare(args.dataset, args.data_dir)}")


if __name__ == "__main__":
    main()
