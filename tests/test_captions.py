"""Tests for diffusion_jax.data.captions: measured properties, captions and the word vocabulary."""

import itertools

import ml_collections
import numpy as np
import pytest

from diffusion_jax.data import captions as C
from diffusion_jax.data import load_split


@pytest.fixture(scope="module")
def digits(digits_data_dir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Train and test splits as training sees them: uint8 [N, 16, 16, 1] and labels [N]."""
    config = ml_collections.ConfigDict({"name": "digits", "image_size": 16, "data_dir": digits_data_dir})
    return {split: load_split(config, split) for split in ("train", "test")}


def _stroke(angle_deg: float, width: int, size: int = 16) -> np.ndarray:
    """A float image in [-1, 1], [size, size, 1]: a vertical bar `width` pixels wide, sheared by `angle_deg`."""
    ink = np.zeros((size, size))
    shear = np.tan(np.radians(angle_deg))
    for row in range(2, size - 2):
        centre = size / 2 + shear * (size / 2 - row)  # rises to the right for a positive angle
        start = int(round(centre - width / 2))
        ink[row, max(start, 0) : start + width] = 1.0
    return (ink * 2 - 1)[..., None]


# ----- the measures, against images whose properties are known


def test_measures_on_synthetic_strokes():
    upright, right, left = _stroke(0, 2), _stroke(25, 2), _stroke(-25, 2)
    assert abs(C.slant(upright)) < 1e-9
    # A "/" stroke with shear tan(25°) = 0.466: the moment estimate recovers it up to pixel rounding.
    assert C.slant(right) == pytest.approx(np.tan(np.radians(25)), abs=0.05)
    assert C.slant(left) == pytest.approx(-C.slant(right), abs=1e-9)
    thin, thick = _stroke(0, 1), _stroke(0, 4)
    assert C.thickness(thick) == pytest.approx(4 * C.thickness(thin))
    # The same image as uint8, as [H, W], and in a batch gives the same numbers.
    as_uint8 = np.round((right + 1) * 127.5).astype(np.uint8)
    np.testing.assert_allclose(C.measure(as_uint8), C.measure(right), atol=1e-12)
    np.testing.assert_allclose(C.measure(right[..., 0]), C.measure(right))
    np.testing.assert_allclose(C.measure(np.stack([thin, right]))[1], C.measure(right))
    with pytest.raises(ValueError, match="images"):
        C.measure(np.zeros((4, 16, 16)))  # a batch without its channel axis


def test_thresholds_are_the_train_terciles(digits):
    images, labels = digits["train"]
    np.testing.assert_allclose(C.fit_thresholds(C.measure(images), labels), C.DIGITS_THRESHOLDS, atol=1e-5)


@pytest.mark.parametrize("p, name", list(enumerate(C.PROPERTIES)))
def test_levels_separate_held_out_digits(digits, p, name):
    """On the 297 test digits, the train terciles give balanced levels far apart in the measured property."""
    images, labels = digits["test"]
    values = C.measure(images)
    lv = C.levels(values, labels)
    fractions = [np.mean(lv[:, p] == level) for level in (-1, 0, 1)]
    assert min(fractions) > 0.2 and max(fractions) < 0.45, fractions
    rel = C.relative(values, labels)[:, p]
    gap = rel[lv[:, p] == 1].mean() - rel[lv[:, p] == -1].mean()
    assert gap > 1.5 * rel.std(), (name, gap, rel.std())  # measured 2.3 (thickness) and 2.0 (slant) std
    # Thickness and slant are separate properties: neither's level predicts the other's value.
    other = C.relative(values, labels)[:, 1 - p]
    other_gap = other[lv[:, p] == 1].mean() - other[lv[:, p] == -1].mean()
    assert abs(other_gap) < 0.5 * other.std()


def test_follows_levels_scores_real_and_shuffled_requests(digits):
    images, labels = digits["test"]
    lv = C.levels(C.measure(images), labels)
    real = C.follows_levels(images, labels, lv)
    shuffled = C.follows_levels(images, labels, np.random.default_rng(0).permutation(lv))
    for name in C.PROPERTIES:
        assert real[name]["accuracy"] == 1.0 and real[name]["auc"] == 1.0
        assert shuffled[name]["accuracy"] < 0.5 and abs(shuffled[name]["auc"] - 0.5) < 0.15
    assert real["thickness"]["gap"] == pytest.approx(0.0736, abs=0.002)


# ----- captions and tokens


def test_every_caption_tokenises_and_parses_back():
    vocab = C.vocabulary()
    count, words = 0, set()
    for label, row in itertools.product(range(10), itertools.product((-1, 0, 1), repeat=2)):
        texts = C.all_captions(label, row)
        assert len(texts) == len(set(texts)) >= 5
        tokens, mask = vocab.encode(texts, C.max_caption_length())
        assert not np.any(tokens[mask] == vocab.unk_id) and np.all(tokens[~mask] == vocab.pad_id)
        assert vocab.decode(tokens, mask) == texts == vocab.decode(tokens)
        expected = C._as_properties(row)
        assert all(C.parse_caption(text) == (label, expected) for text in texts)
        count += len(texts)
        words.update(C.tokenize(" ".join(texts)))
    assert count > 5000
    assert set(vocab.words) == words  # exactly the templates' words


def test_caption_examples_and_errors():
    assert C.all_captions(7, {"thickness": "thick"})[0] == "a thick seven"
    assert C.caption(8, {}, 0) == "an eight" and C.caption(8, [0, 0], 1) == "an 8"
    assert C.caption(1, {"slant": -1}, 0) == "a one, slanted left"
    assert "thick" in C.tokenize(C.caption(3, {"thickness": 1, "slant": None}, np.random.default_rng(0)))
    with pytest.raises(ValueError, match="properties"):
        C.caption(3, {"colour": "red"}, 0)
    with pytest.raises(ValueError, match="thickness"):
        C.caption(3, {"thickness": "wide"}, 0)
    with pytest.raises(ValueError, match="label"):
        C.caption(10, {}, 0)


def test_vocabulary_encode_decode():
    vocab = C.vocabulary()
    assert vocab.tokens[:2] == ("<pad>", "<unk>") and list(vocab.words) == sorted(vocab.words)
    tokens, mask = vocab.encode(["A thick 7, leaning right", "the digit zebra"])
    assert tokens.dtype == np.int32 and mask.dtype == bool and tokens.shape == mask.shape == (2, 6)
    assert mask.sum(1).tolist() == [6, 3] and tokens[1, 2] == vocab.unk_id
    assert vocab.decode(tokens, mask) == ["a thick 7, leaning right", "the digit <unk>"]
    with pytest.raises(ValueError, match="max_len"):
        vocab.encode(["a thick seven"], max_len=2)


def test_caption_split_is_deterministic_and_matches_the_images(digits):
    images, labels = digits["train"]
    first, again = C.caption_split(images, labels, seed=3), C.caption_split(images, labels, seed=3)
    other = C.caption_split(images, labels, seed=4)
    assert first.captions == again.captions and np.array_equal(first.tokens, again.tokens)
    assert np.mean([a != b for a, b in zip(first.captions, other.captions, strict=True)]) > 0.5
    n = len(labels)
    assert first.tokens.shape == first.mask.shape == (n, C.max_caption_length()) and first.tokens.dtype == np.int32
    assert C.vocabulary().decode(first.tokens, first.mask) == first.captions
    # The caption's words say what the image measures: read the levels back from the text.
    parsed = [C.parse_caption(text) for text in first.captions]
    assert [label for label, _ in parsed] == labels.tolist()
    for p, name in enumerate(C.PROPERTIES):
        low_word, high_word = C.LEVELS[name]
        said = np.array([{low_word: -1, high_word: 1}.get(words.get(name), 0) for _, words in parsed])
        np.testing.assert_array_equal(said, first.levels[:, p])
        for k in range(10):  # within a class, every 'thick' digit measures thicker than every other one
            v = first.values[labels == k, p]
            s = said[labels == k]
            assert v[s == 1].min() > v[s == 0].max() and v[s == 0].min() > v[s == -1].max()
    # Numbers come as words and as digits.
    assert 0.4 < np.mean([any(c.isdigit() for c in text) for text in first.captions]) < 0.6
