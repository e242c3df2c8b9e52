"""Tests of the data pipeline: digits builder, toy distributions, batch order and sharding."""

import importlib.util
import os
import socket
import subprocess
import sys
import textwrap
import time

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from jax.sharding import NamedSharding, PartitionSpec
from sklearn.datasets import load_digits

from diffusion_jax.data import (
    DATASETS,
    DatasetNotPreparedError,
    create_iterator,
    example_shape,
    num_classes,
    prepare_digits,
    toy,
)
from diffusion_jax.data import prepare as prepare_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    directory = str(tmp_path_factory.mktemp("tfds"))
    prepare_digits(directory)
    return directory


@pytest.fixture(scope="module")
def sharding() -> NamedSharding:
    """One device; `test_batches_do_not_depend_on_the_device_count` covers the 8 of conftest."""
    return NamedSharding(jax.make_mesh((1,), ("data",), devices=jax.devices()[:1]), PartitionSpec("data"))


def data_config(**fields) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(fields)


def take(iterator, n: int) -> list[dict[str, np.ndarray]]:
    return [{k: np.asarray(v) for k, v in next(iterator).items()} for _ in range(n)]


def digits_batches(digits_dir, sharding, n, *, seed=0, start_step=0, batch=16, **fields):
    config = data_config(name="digits", data_dir=digits_dir, **fields)
    it = create_iterator(config, global_batch_size=batch, seed=seed, start_step=start_step, sharding=sharding)
    return take(it, n)


def test_digits_builder_matches_sklearn(digits_dir):
    builder = prepare_digits(digits_dir)
    assert builder.info.splits["train"].num_examples == 1500
    assert builder.info.splits["test"].num_examples == 297
    digits = load_digits()
    order = np.random.default_rng(0).permutation(1797)
    expected = np.round(digits.images * 255 / 16).astype(np.uint8)[..., None]
    for split, indices in (("train", order[:1500]), ("test", order[1500:])):
        source = builder.as_data_source(split)
        images = np.stack([source[i]["image"] for i in range(len(source))])
        labels = np.array([source[i]["label"] for i in range(len(source))])
        assert images.dtype == np.uint8 and images.shape == (len(indices), 8, 8, 1)
        np.testing.assert_array_equal(images, expected[indices])
        np.testing.assert_array_equal(labels, digits.target[indices])
        assert set(labels) == set(range(10))
    grey_levels = np.unique(np.stack([s["image"] for s in builder.as_data_source("train")]))
    np.testing.assert_array_equal(grey_levels, np.round(np.arange(17) * 255 / 16))


def test_prepare_digits_is_a_no_op_when_prepared(digits_dir):
    record = next(p for p in os.listdir(prepare_digits(digits_dir).data_dir) if "train" in p)
    path = os.path.join(prepare_digits(digits_dir).data_dir, record)
    before = os.stat(path).st_mtime_ns
    start = time.perf_counter()
    prepare_digits(digits_dir)
    assert time.perf_counter() - start < 1.0
    assert os.stat(path).st_mtime_ns == before


def test_digit_batches_shape_dtype_range(digits_dir, sharding):
    (batch,) = digits_batches(digits_dir, sharding, 1, batch=32)
    assert batch["image"].shape == (32, 16, 16, 1) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (32,) and batch["label"].dtype == np.int32
    assert batch["image"].min() == -1.0 and batch["image"].max() == 1.0
    assert set(batch["label"]) <= set(range(10))
    it = create_iterator(
        data_config(name="digits", data_dir=digits_dir), global_batch_size=8, seed=0, start_step=0, sharding=sharding
    )
    arrays = next(it)
    assert all(a.sharding.is_equivalent_to(sharding, a.ndim) for a in arrays.values())


def test_native_size_keeps_the_17_grey_levels(digits_dir, sharding):
    (batch,) = digits_batches(digits_dir, sharding, 1, batch=64, image_size=8)
    assert batch["image"].shape == (64, 8, 8, 1)
    levels = np.round(np.arange(17) * 255 / 16) / 127.5 - 1.0
    np.testing.assert_allclose(np.unique(batch["image"]), levels, atol=1e-6)


def test_order_is_a_function_of_seed_and_step(digits_dir, sharding):
    first = digits_batches(digits_dir, sharding, 5, seed=7, random_flip=True)
    again = digits_batches(digits_dir, sharding, 5, seed=7, random_flip=True)
    resumed = digits_batches(digits_dir, sharding, 2, seed=7, start_step=3, random_flip=True)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
    for a, b in zip(first[3:], resumed, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    other_seed = digits_batches(digits_dir, sharding, 1, seed=8, random_flip=True)
    assert not np.array_equal(first[0]["image"], other_seed[0]["image"])
    assert not np.array_equal(first[0]["image"], first[1]["image"])


def test_each_epoch_visits_every_example_once_in_a_new_order(digits_dir, sharding):
    source = prepare_digits(digits_dir).as_data_source("test")
    examples = sorted(np.asarray(e["image"]).tobytes() for e in source)
    # With B = 297 = the size of the test split, batch e is epoch e.
    epochs = digits_batches(digits_dir, sharding, 2, batch=297, split="test", image_size=8)
    for epoch in epochs:
        pixels = np.round((epoch["image"] + 1.0) * 127.5).astype(np.uint8)
        assert sorted(p.tobytes() for p in pixels) == examples
    assert not np.array_equal(epochs[0]["label"], epochs[1]["label"])
    # Batch 1 of size 200 holds stream positions 200..399: the end of epoch 0, then the
    # start of epoch 1.
    (straddle,) = digits_batches(digits_dir, sharding, 1, batch=200, start_step=1, split="test", image_size=8)
    expected = np.concatenate([epochs[0]["image"][200:], epochs[1]["image"][:103]])
    np.testing.assert_array_equal(straddle["image"], expected)


def test_random_flip_mirrors_about_half_reproducibly(digits_dir, sharding):
    (plain,) = digits_batches(digits_dir, sharding, 1, batch=256, seed=3)
    (flipped,) = digits_batches(digits_dir, sharding, 1, batch=256, seed=3, random_flip=True)
    np.testing.assert_array_equal(plain["label"], flipped["label"])
    same = np.all(plain["image"] == flipped["image"], axis=(1, 2, 3))
    mirrored = np.all(plain["image"][:, :, ::-1] == flipped["image"], axis=(1, 2, 3))
    assert np.all(same | mirrored)
    assert 0.3 < np.mean(mirrored & ~same) < 0.7


def test_example_shape_and_classes():
    assert example_shape(data_config(name="digits")) == (16, 16, 1)
    assert example_shape(data_config(name="digits", image_size=8)) == (8, 8, 1)
    assert example_shape(data_config(name="cifar10")) == (32, 32, 3)
    assert example_shape(data_config(name="two_moons")) == (2,)
    assert num_classes(data_config(name="cifar10")) == 10
    assert num_classes(data_config(name="swiss_roll")) == 0


def test_center_crop_keeps_the_aspect_and_takes_the_middle():
    from diffusion_jax.data.pipeline import _center_crop

    wide = np.zeros((20, 60, 3), np.uint8)
    wide[:, 20:40] = 255  # the middle third is white
    out = _center_crop(wide, 4)  # halved to 10x30 (box), bicubic to 4x12, the middle 4x4
    assert out.shape == (4, 4, 3) and out.dtype == np.uint8 and out.min() > 200  # a squashing resize: grey edges
    tall = np.zeros((9, 5, 1), np.uint8)
    tall[:2], tall[-2:] = 255, 255  # top and bottom bands fall outside the centre square
    assert _center_crop(tall, 5).shape == (5, 5, 1) and _center_crop(tall, 5).max() < 255


def test_unknown_dataset_names_the_field_and_choices(sharding):
    with pytest.raises(ValueError, match="data.name") as info:
        create_iterator(data_config(name="mnist"), global_batch_size=8, seed=0, start_step=0, sharding=sharding)
    names = ("digits", "cifar10", "imagenet2012", "swiss_roll", "eight_gaussians", "two_moons")
    for name in names:
        assert name in str(info.value)
    assert set(DATASETS) == set(names)


def test_bad_batch_size_names_training_batch_size(sharding):
    with pytest.raises(ValueError, match="training.batch_size"):
        create_iterator(data_config(name="two_moons"), global_batch_size=0, seed=0, start_step=0, sharding=sharding)


@pytest.mark.parametrize("name", ["swiss_roll", "eight_gaussians", "two_moons"])
def test_toy_samplers_are_seeded_unit_scale_float32(name):
    sample = toy.DISTRIBUTIONS.get(name)
    points = sample(0, 20_000)
    assert points.shape == (20_000, 2) and points.dtype == np.float32
    np.testing.assert_array_equal(points, sample(np.random.default_rng(0), 20_000))
    assert not np.array_equal(points, sample(1, 20_000))
    assert np.all((0.5 < points.std(axis=0)) & (points.std(axis=0) < 1.5))


def test_eight_gaussians_cluster_at_the_eight_centres():
    points = toy.eight_gaussians(0, 80_000)
    centres = toy.eight_gaussian_centres()
    distances = np.linalg.norm(points[:, None] - centres[None], axis=-1)
    nearest = distances.argmin(axis=1)
    np.testing.assert_allclose(np.bincount(nearest, minlength=8) / len(points), 1 / 8, atol=0.01)
    for k in range(8):
        cluster = points[nearest == k]
        np.testing.assert_allclose(cluster.mean(axis=0), centres[k], atol=0.01)
        np.testing.assert_allclose(cluster.std(axis=0), 0.15, rtol=0.05)


def test_swiss_roll_and_two_moons_lie_on_their_curves():
    roll = toy.swiss_roll(0, 10_000, noise=0.0) * 7.0  # back to (t cos t, t sin t)
    t = np.linalg.norm(roll, axis=1)
    assert t.min() >= 1.5 * np.pi - 1e-3 and t.max() <= 4.5 * np.pi + 1e-3
    np.testing.assert_allclose(roll[:, 0], t * np.cos(t), atol=1e-3)
    moons = toy.two_moons(0, 10_000, noise=0.0) * 0.7 + np.array([0.5, 0.25])
    upper = np.abs(np.linalg.norm(moons, axis=1) - 1.0) < 1e-5
    lower = np.abs(np.linalg.norm(moons - np.array([1.0, 0.5]), axis=1) - 1.0) < 1e-5
    assert np.all(upper | lower) and 0.45 < upper.mean() < 0.55


def test_toy_batches_resume_and_have_zero_labels(sharding):
    def batches(start_step, n):
        it = create_iterator(
            data_config(name="eight_gaussians"), global_batch_size=32, seed=1, start_step=start_step, sharding=sharding
        )
        return take(it, n)

    first, resumed = batches(0, 4), batches(2, 2)
    assert first[0]["image"].shape == (32, 2) and first[0]["image"].dtype == np.float32
    assert first[0]["label"].dtype == np.int32 and not first[0]["label"].any()
    for a, b in zip(first[2:], resumed, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
    assert not np.array_equal(first[0]["image"], first[1]["image"])


def test_cifar10_reads_through_tfds_mock(tmp_path, sharding):
    config = data_config(name="cifar10", data_dir=str(tmp_path), random_flip=True)
    with tfds.testing.mock_data(num_examples=10, policy=tfds.testing.MockPolicy.USE_CODE):
        batches = take(create_iterator(config, global_batch_size=4, seed=0, start_step=0, sharding=sharding), 3)
        config.image_size = 16
        (small,) = take(create_iterator(config, global_batch_size=4, seed=0, start_step=0, sharding=sharding), 1)
    assert batches[0]["image"].shape == (4, 32, 32, 3) and small["image"].shape == (4, 16, 16, 3)
    for batch in batches:
        assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
        assert set(batch["label"]) <= set(range(10))


def test_cifar10_not_prepared_fails_fast_with_instructions(tmp_path, sharding):
    config = data_config(name="cifar10", data_dir=str(tmp_path))
    start = time.perf_counter()
    with pytest.raises(DatasetNotPreparedError) as info:
        create_iterator(config, global_batch_size=8, seed=0, start_step=0, sharding=sharding)
    assert time.perf_counter() - start < 10.0
    message = str(info.value)
    assert "\n" not in message
    for part in (
        "data.name",
        "data.data_dir",
        str(tmp_path),
        "prepare",
        f"--dataset=cifar10 --data_dir={tmp_path}",
        "diffusion-jax[tf]",
    ):
        assert part in message


def test_prepare_command(tmp_path, capsys):
    prepare_cli.main(["--dataset=digits", f"--data_dir={tmp_path}"])
    assert "digits is ready" in capsys.readouterr().out
    assert prepare_digits(str(tmp_path)).info.splits["train"].num_examples == 1500
    if importlib.util.find_spec("tensorflow") is None:
        with pytest.raises(SystemExit, match="diffusion-jax\\[tf\\]"):
            prepare_cli.main(["--dataset=cifar10", f"--data_dir={tmp_path}"])


_TWO_PROCESS_SCRIPT = textwrap.dedent("""
    import sys
    import jax
    jax.config.update("jax_num_cpu_devices", 2)
    port, pid, data_dir, out = sys.argv[1:]
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=int(pid))
    import ml_collections, numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec
    from diffusion_jax.data import create_iterator
    from diffusion_jax.errors import ConfigError
    sharding = NamedSharding(jax.make_mesh((4,), ("data",)), PartitionSpec("data"))
    config = ml_collections.ConfigDict(dict(name="digits", data_dir=data_dir, random_flip=True))
    try:
        create_iterator(config, global_batch_size=6, seed=5, start_step=0, sharding=sharding)
        raise SystemExit("global_batch_size=6 on 4 devices was accepted")
    except ConfigError as e:
        assert "training.batch_size=6" in str(e), e
    it = create_iterator(config, global_batch_size=16, seed=5, start_step=3, sharding=sharding)
    batch = next(it)
    local = batch["image"].addressable_shards[0].data.shape[0]
    gathered = multihost_utils.process_allgather(batch, tiled=True)
    if jax.process_index() == 0:
        np.savez(out, local_rows=local, **gathered)
""")


def test_two_processes_build_the_single_process_batch(digits_dir, sharding, tmp_path):
    """Two processes x 2 CPU devices: each loads its rows; together they give the same batch."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "batch.npz"
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _TWO_PROCESS_SCRIPT, str(port), str(pid), digits_dir, str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for pid in range(2)
    ]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    result = np.load(out)
    assert int(result["local_rows"]) == 4
    (expected,) = digits_batches(digits_dir, sharding, 1, batch=16, seed=5, start_step=3, random_flip=True)
    np.testing.assert_array_equal(result["image"], expected["image"])
    np.testing.assert_array_equal(result["label"], expected["label"])


def test_batches_do_not_depend_on_the_device_count(digits_dir, sharding):
    eight = NamedSharding(jax.make_mesh((8,), ("data",)), PartitionSpec("data"))
    config = data_config(name="digits", data_dir=digits_dir, random_flip=True)
    it = create_iterator(config, global_batch_size=16, seed=2, start_step=5, sharding=eight)
    sharded = next(it)
    assert len(sharded["image"].sharding.device_set) == 8
    (single,) = digits_batches(digits_dir, sharding, 1, batch=16, seed=2, start_step=5, random_flip=True)
    for key in ("image", "label"):
        np.testing.assert_array_equal(np.asarray(sharded[key]), single[key])
