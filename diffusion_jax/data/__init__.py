"""Input data: the tfds/grain pipeline, the embedded digits dataset and 2-D toy data.

batches = create_iterator(config.data, global_batch_size=128, seed=0,
                          start_step=step, sharding=NamedSharding(mesh, P("data")))
example_shape(config.data)  # (16, 16, 1) for digits: build the model before reading
"""

from diffusion_jax.data import toy
from diffusion_jax.data.digits import Digits, prepare_digits
from diffusion_jax.data.pipeline import (
    DATASETS,
    DatasetNotPreparedError,
    ImageDataset,
    ToyDataset,
    create_iterator,
    data_dir,
    example_shape,
    load_split,
    num_classes,
)

__all__ = [
    "DATASETS",
    "DatasetNotPreparedError",
    "Digits",
    "ImageDataset",
    "ToyDataset",
    "create_iterator",
    "data_dir",
    "example_shape",
    "load_split",
    "num_classes",
    "prepare_digits",
    "toy",
]
