"""The offline digits metric: the shipped classifier, digits-FID, the Inception-Score analogue and class accuracy."""

import json

import jax
import ml_collections
import numpy as np
import pytest
from conftest import tiny_digits_config
from flax import nnx

import diffusion_jax as dj
from diffusion_jax.data import load_split
from diffusion_jax.metrics import digits
from diffusion_jax.metrics.train_digits_classifier import (
    load_digits_split,
    random_shifts,
    train_classifier,
    write_weights,
)
from diffusion_jax.training.setup import build_model, build_process, model_apply

NUM_TEST = 297  # the test split; every FID below is at this N, so the values are comparable


@pytest.fixture(scope="module")
def evaluator() -> digits.DigitsEvaluator:
    return digits.DigitsEvaluator.load()


def pipeline_split(data_dir: str, split: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The split as the training pipeline reads it: uint8 [N, size, size, 1] (PIL bilinear from 8×8), labels [N]."""
    return load_split(ml_collections.ConfigDict(dict(name="digits", image_size=size, data_dir=data_dir)), split)


@pytest.fixture(scope="module")
def test_split(digits_data_dir) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """{image size: (uint8 images [297, S, S, 1], labels [297])} for S = 8 and 16."""
    return {size: pipeline_split(digits_data_dir, "test", size) for size in (8, 16)}


@pytest.fixture(scope="module")
def untrained_samples(digits_data_dir) -> np.ndarray:
    """297 DDIM samples (5 steps) of the tiny digits U-Net at its initialisation: float [297, 8, 8, 1]."""
    config = tiny_digits_config(digits_data_dir)
    graphdef, init = build_model(config, (8, 8, 1))
    params = init(jax.random.key(0))

    def model_fn(x: jax.Array, t: jax.Array) -> jax.Array:
        return model_apply(graphdef, params, x, t)

    x_T = jax.random.normal(jax.random.key(1), (NUM_TEST, 8, 8, 1))
    sampler = dj.samplers.get("ddim")
    return np.asarray(sampler(model_fn, build_process(config), jax.random.key(2), x_T, steps=5, prediction="eps"))


def gaussian_noise(n: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, 8, 8, 1)).astype(np.float32)


def test_pipeline_images_come_back_to_the_originals(test_split):
    """The downsampling inverts the pipeline's PIL bilinear 8 -> 16 resize to within PIL's rounding."""
    native = digits.to_native(test_split[8][0])
    back = digits.to_native(test_split[16][0])
    assert back.shape == native.shape == (NUM_TEST, 8, 8, 1)
    assert np.max(np.abs(back - native)) * 127.5 < 1.1  # grey levels
    np.testing.assert_array_equal(digits.to_native(test_split[8][0]), test_split[8][0] / np.float32(127.5) - 1)


@pytest.mark.parametrize("size", [8, 16])
def test_shipped_classifier_accuracy_on_the_test_split(evaluator, test_split, size):
    images, labels = test_split[size]
    accuracy = evaluator.class_accuracy(images, labels)
    assert accuracy >= 0.97
    assert accuracy >= evaluator.metadata["test_accuracy"] - 1 / NUM_TEST  # at most one image off the record


def test_uint8_and_float_inputs_agree(evaluator, test_split):
    images = test_split[8][0]
    np.testing.assert_allclose(evaluator.logits(images), evaluator.logits(images / 127.5 - 1.0), atol=1e-5)


def test_padding_does_not_change_features(evaluator, test_split):
    """297 images take two padded batches of 256; a row's features do not depend on its batch."""
    images = test_split[8][0]
    np.testing.assert_allclose(evaluator.features(images)[-5:], evaluator.features(images[-5:]), atol=1e-5)
    assert evaluator.features(images).shape == (NUM_TEST, digits.FEATURE_DIM)


def test_test_split_fid_is_far_below_noise_and_an_untrained_model(evaluator, test_split, untrained_samples):
    """The issue's property, all at N = 297 against the shipped train-split statistics."""
    fid_test_8 = digits.digits_fid(test_split[8][0])
    fid_test_16 = digits.digits_fid(test_split[16][0])
    fid_noise = digits.digits_fid(gaussian_noise(NUM_TEST))
    fid_untrained = digits.digits_fid(untrained_samples)
    print(f"digits-FID at N={NUM_TEST}: test split {fid_test_8:.2f} (8x8), {fid_test_16:.2f} (16x16); "
          f"noise {fid_noise:.1f}; untrained U-Net {fid_untrained:.1f}")
    assert fid_test_8 == pytest.approx(evaluator.metadata["test_fid"], rel=1e-3)
    assert abs(fid_test_16 - fid_test_8) < 0.5
    assert 10 * fid_test_8 < fid_noise
    assert 10 * fid_test_8 < fid_untrained


def test_fid_of_the_train_split_against_its_own_statistics_is_zero(evaluator, digits_data_dir):
    train_images, _ = pipeline_split(digits_data_dir, "train", 16)
    assert evaluator.reference.num == len(train_images) == 1500
    assert evaluator.fid(train_images) == pytest.approx(0.0, abs=0.05)  # 16x16 round trip: PIL rounding only


def test_inception_score_analogue(test_split, untrained_samples):
    score_test = digits.digits_inception_score(test_split[8][0])
    score_noise = digits.digits_inception_score(gaussian_noise(NUM_TEST))
    score_untrained = digits.digits_inception_score(untrained_samples)
    print(f"IS analogue: test split {score_test:.2f}, noise {score_noise:.2f}, untrained U-Net {score_untrained:.2f}")
    assert 8.5 < score_test <= 10.0
    assert score_noise < 4.0 and score_untrained < 4.0


def test_class_accuracy_of_true_and_permuted_labels(test_split):
    images, labels = test_split[16]
    permuted = np.random.default_rng(0).permutation(labels)
    assert digits.class_accuracy(images, labels) >= 0.97
    assert digits.class_accuracy(images, permuted) < 0.3


def test_class_entropy_is_high_for_the_test_split_and_zero_for_one_digit(test_split):
    images, labels = test_split[16]
    evaluator = digits.default_evaluator()
    assert evaluator.class_entropy(images) > 0.98 * np.log(10)  # the test split is about class-balanced (2.28)
    assert evaluator.class_entropy(images[labels == 3]) < 0.25  # one digit: (almost) one class (21 of 22 right)


def test_training_is_deterministic(digits_data_dir):
    """Two short runs give bit-identical weights; another seed gives other weights, and training moves them."""
    images, labels = load_digits_split(digits_data_dir, "train")
    images, labels = images[:256], labels[:256]
    first = digits.flat_params(train_classifier(images, labels, steps=3, batch_size=32))
    second = digits.flat_params(train_classifier(images, labels, steps=3, batch_size=32))
    other_seed = digits.flat_params(train_classifier(images, labels, steps=3, batch_size=32, seed=1))
    initial = digits.flat_params(digits.DigitsClassifier(rngs=nnx.Rngs(0)))
    assert first.keys() == second.keys() == initial.keys()
    for name in first:
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)
    assert any(not np.array_equal(first[name], other_seed[name]) for name in first)
    assert not np.array_equal(first["conv1/kernel"], initial["conv1/kernel"])


def test_random_shifts_move_each_image_by_at_most_one_pixel():
    x = np.random.default_rng(0).uniform(-1, 1, (64, 8, 8, 1)).astype(np.float32)
    shifted = np.asarray(random_shifts(jax.random.key(0), x))
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-1.0)
    candidates = np.stack([padded[:, 1 - dy:9 - dy, 1 - dx:9 - dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)])
    matches = np.all(candidates == shifted[None], axis=(2, 3, 4))  # [9 shifts, 64 images]
    assert np.all(matches.sum(axis=0) == 1)  # each image is exactly one of the nine shifts of itself
    assert np.all(matches.sum(axis=1) > 0)  # and all nine occur


def test_weights_file_round_trip(digits_data_dir, tmp_path, test_split):
    """The script's file loads back: same parameters, and reference statistics of the train split's features."""
    path = tmp_path / "classifier.npz"
    metadata = write_weights(path, digits_data_dir, steps=2)
    loaded = digits.DigitsEvaluator.load(path)
    assert loaded.metadata == metadata and loaded.metadata["steps"] == 2
    train_images, _ = load_digits_split(digits_data_dir, "train")
    features = loaded.features(train_images)
    np.testing.assert_allclose(loaded.reference.mu, features.mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loaded.reference.sigma, np.cov(features.astype(np.float64), rowvar=False),
                               rtol=1e-4, atol=1e-6)
    assert loaded.fid(test_split[8][0]) == pytest.approx(metadata["test_fid"], rel=1e-6)


@pytest.mark.parametrize(
    "images, match",
    [
        (np.zeros((4, 8, 8, 3), np.uint8), r"square greyscale images \[N, S, S, 1\]"),
        (np.zeros((4, 8, 8), np.uint8), r"square greyscale images \[N, S, S, 1\]"),
        (np.zeros((4, 16, 8, 1), np.uint8), r"square greyscale images \[N, S, S, 1\]"),
        (np.zeros((4, 4, 4, 1), np.uint8), "the side S must be at least 8"),
        (np.zeros((4, 8, 8, 1), np.int32), "dtype must be uint8 .* or a float type"),
        (np.zeros((0, 8, 8, 1), np.uint8), "at least one image"),
        (np.full((4, 8, 8, 1), np.nan, np.float32), "256 values are NaN or infinite"),
    ],
)
def test_bad_images_are_rejected(evaluator, images, match):
    with pytest.raises(ValueError, match=match):
        evaluator.logits(images)


def test_bad_labels_and_weights_files_are_rejected(evaluator, test_split, tmp_path):
    images, labels = test_split[8]
    with pytest.raises(ValueError, match=r"integer class labels \[N\] for N=297"):
        evaluator.class_accuracy(images, labels[:10])
    with pytest.raises(ValueError, match=r"classes are 0..9"):
        evaluator.class_accuracy(images, labels + 1)
    with pytest.raises(ValueError, match="no reference statistics"):
        digits.DigitsEvaluator(digits.DigitsClassifier(rngs=nnx.Rngs(0))).fid(images)
    old = tmp_path / "old.npz"
    np.savez(old, version=np.asarray("digits-cnn-0"))
    with pytest.raises(ValueError, match="weights version 'digits-cnn-0'.*train_digits_classifier"):
        digits.DigitsEvaluator.load(old)


def test_the_command_scores_sample_files(evaluator, digits_data_dir, tmp_path, capsys):
    images, _ = pipeline_split(digits_data_dir, "test", 16)
    np.savez(tmp_path / "samples_1.npz", arr_0=images)
    digits.main([str(tmp_path / "samples_1.npz")])
    line = json.loads(capsys.readouterr().out)
    assert line["num_samples"] == len(images) and line["classifier"] == digits.VERSION
    assert line["digits_fid"] == pytest.approx(evaluator.fid(images))
