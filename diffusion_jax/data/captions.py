"""Captions for the embedded digits: text conditioning that runs offline.

Each digit gets an English caption composed from its label and from properties measured on its
image, e.g. "a thick seven", "the digit 2 in fine strokes, leaning left", "a 4 that leans to the
right". The measures are plain functions of the image, so the same function that writes the
caption of a training image checks a generated one: a text-to-image model follows its captions
when the thickness and slant it draws for "thick" / "leaning right" land in the requested tercile.

Properties (`PROPERTIES`), measured on greyscale images, ink = (x + 1) / 2 for float images in
[-1, 1] (the range the pipeline trains on and samplers return; values outside it are clipped), or
x / 255 for uint8 images:

  thickness  the ink mass, mean ink over the image. The NIST preprocessing behind the UCI data
             (Alpaydin & Kaynak 1998) normalises every digit's size, so more ink means wider
             strokes. Almost resolution-free: identical at 8x8 and at the pipeline's 16x16.
  slant      the shear of the ink from its second central moments (image moments, Hu 1962; the
             estimate of moment-based deskewing): slant = -cov(x, y) / var(y) with x to the right
             and y down, so the ink's x moves right by `slant` per unit it rises. Positive leans
             right ("/"), negative leans left ("\\"). Dimensionless on square images.

Levels: each property splits into -1 (lower tercile: 'thin', 'left'), 0 (middle tercile, not
mentioned in captions) and +1 (upper tercile: 'thick', 'right'), with terciles PER CLASS. The
class's own terciles matter for slant, whose class medians differ by more than the spread within
a class (the sevens' diagonal makes the typical 7 lean right: median +0.13, the typical 6 -0.20),
so 'leaning right' means "more than the typical digit of its class". Thickness class medians are
close (0.295-0.321); per-class terciles keep every class balanced for both.

`DIGITS_THRESHOLDS` holds the terciles of the 1,500-image train split at the pipeline's 16x16
(PIL bilinear from uint8, as `data.pipeline.load_split`), computed by

    images, labels = load_split(ml_collections.ConfigDict({"name": "digits", "image_size": 16}), "train")
    fit_thresholds(measure(images), labels)

(tests/test_captions.py recomputes it). On the 297 held-out test images these thresholds put
27-38% of the images at each level, and the thick - thin group means differ by 0.073 in
thickness (2.3 standard deviations of the split's thickness), the right - left group means by
0.18 in slant relative to the class midpoint (2.0 standard deviations of that relative slant);
the train split gives 0.074 and 0.18.

Tokens: `vocabulary()` is a word-level `Vocabulary` of exactly the words the templates use (a
sorted list after <pad> = 0 and <unk> = 1); `caption_split` captions and tokenises a whole split,
deterministically from a seed, for the pipeline to attach `tokens` / `token_mask` to batches.
"""

import dataclasses
import functools
import itertools
import re
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

PROPERTIES: tuple[str, ...] = ("thickness", "slant")
LEVELS: dict[str, tuple[str, str]] = {"thickness": ("thin", "thick"), "slant": ("left", "right")}  # (-1, +1)
NUM_CLASSES = 10

# Terciles [class, property, (lower, upper)] of `measure` over the train split at 16x16 (module docstring).
DIGITS_THRESHOLDS = np.array(
    [
        [[0.28719, 0.33119], [-0.05001, 0.00145]],
        [[0.29013, 0.31910], [-0.06207, 0.02452]],
        [[0.29587, 0.32829], [-0.16787, -0.09046]],
        [[0.27649, 0.31838], [-0.10697, -0.03848]],
        [[0.29698, 0.31777], [-0.02139, 0.02838]],
        [[0.28905, 0.31532], [-0.05012, 0.02719]],
        [[0.28511, 0.32224], [-0.22832, -0.16676]],
        [[0.28288, 0.31146], [0.10724, 0.16295]],
        [[0.30629, 0.33758], [-0.04034, 0.03680]],
        [[0.28415, 0.32631], [-0.12431, -0.06149]],
    ]
)  # fmt: skip

NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Phrases for each level of each property: 'adj' precedes the number ("a thick seven"), 'adv' follows
# "written" ("a 7, written boldly"), 'phrase' follows the number ("a 7 leaning right"), 'dir' ends
# "that leans to the ...".
_THICKNESS = {
    "thin": {"adj": ("thin", "light", "fine"), "adv": ("thin", "lightly", "finely")},
    "thick": {"adj": ("thick", "bold", "heavy"), "adv": ("thick", "boldly", "heavily")},
}
_SLANT = {
    side: {
        "phrase": (f"slanted {side}", f"leaning {side}", f"tilted to the {side}", f"slanting to the {side}"),
        "dir": (side,),
    }
    for side in ("left", "right")
}

# Templates by which properties the caption mentions. Slots: {a} the article ("a" / "an", fixed up
# after filling), {n} the number, {adj}/{adv} a thickness word, {phrase}/{dir} a slant phrase.
_TEMPLATES: dict[tuple[bool, bool], tuple[str, ...]] = {
    (False, False): ("{a} {n}", "the digit {n}", "the number {n}", "{a} handwritten {n}", "{n}"),
    (True, False): (
        "{a} {adj} {n}",
        "{a} {n} in {adj} strokes",
        "the digit {n}, written {adv}",
        "{a} {n} drawn with {adj} lines",
        "{a} {adj} handwritten {n}",
        "the number {n} in {adj} strokes",
    ),
    (False, True): (
        "{a} {n}, {phrase}",
        "the digit {n}, {phrase}",
        "{a} {n} {phrase}",
        "{a} handwritten {n} {phrase}",
        "{a} {n} that leans to the {dir}",
    ),
    (True, True): (
        "{a} {adj} {n}, {phrase}",
        "{a} {adj} {n} {phrase}",
        "the digit {n} in {adj} strokes, {phrase}",
        "{a} {n} {phrase}, written {adv}",
        "{a} {adj} handwritten {n} that leans to the {dir}",
        "{a} {n} drawn with {adj} lines, {phrase}",
    ),
}

_TOKEN_RE = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


# ---------------------------------------------------------------------------------------------
# Measured properties


def _ink(images: np.ndarray) -> np.ndarray:
    """Greyscale ink in [0, 1], [..., H, W], from [..., H, W, C] (or one [H, W]) images."""
    images = np.asarray(images)
    if images.ndim == 2:
        images = images[..., None]
    if images.ndim < 3 or images.shape[-1] not in (1, 3):
        raise ValueError(
            f"images: expected [..., H, W, C] with C = 1 or 3 (or one [H, W] image), got shape {images.shape}"
        )
    if images.dtype == np.uint8:
        ink = images.astype(np.float64) / 255.0
    else:
        ink = (images.astype(np.float64) + 1.0) / 2.0
    return np.clip(ink.mean(axis=-1), 0.0, 1.0)  # [..., H, W]


def thickness(images: np.ndarray) -> np.ndarray:
    """Ink mass: the mean ink of each image, in [0, 1]; [..., H, W, C] -> [...] (module docstring)."""
    return _ink(images).mean(axis=(-2, -1))


def slant(images: np.ndarray) -> np.ndarray:
    """Shear of the ink, -cov(x, y) / var(y) (x right, y down); [..., H, W, C] -> [...]; > 0 leans right.

    Pixel centres sit at x, y in (-1, 1); moments are weighted by the ink (Hu 1962). An image
    without ink has slant 0.
    """
    ink = _ink(images)  # [..., H, W]
    h, w = ink.shape[-2:]
    ys = ((np.arange(h) + 0.5) / h * 2 - 1)[:, None]  # [H, 1]
    xs = ((np.arange(w) + 0.5) / w * 2 - 1)[None, :]  # [1, W]
    mass = np.maximum(ink.sum(axis=(-2, -1)), 1e-12)[..., None, None]  # [..., 1, 1]
    cx = (ink * xs).sum(axis=(-2, -1), keepdims=True) / mass
    cy = (ink * ys).sum(axis=(-2, -1), keepdims=True) / mass
    cov_xy = (ink * (xs - cx) * (ys - cy)).sum(axis=(-2, -1)) / mass[..., 0, 0]
    var_y = (ink * (ys - cy) ** 2).sum(axis=(-2, -1)) / mass[..., 0, 0]
    return np.where(var_y > 1e-12, -cov_xy / np.maximum(var_y, 1e-12), 0.0)


def measure(images: np.ndarray) -> np.ndarray:
    """All properties, float64 [..., len(PROPERTIES)] in `PROPERTIES` order, of [..., H, W, C] images."""
    return np.stack([thickness(images), slant(images)], axis=-1)


def _check_labels(labels: np.ndarray, n: int | None = None) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or (n is not None and labels.shape[0] != n):
        raise ValueError(f"labels: expected shape [{n if n is not None else 'N'}], got {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(f"labels: expected classes in 0..{NUM_CLASSES - 1}, got {labels.min()}..{labels.max()}")
    return labels.astype(np.int64)


def fit_thresholds(values: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-class terciles of measured `values` [N, P] (from `measure`): [NUM_CLASSES, P, 2] float64.

    np.quantile's default (linear) interpolation at 1/3 and 2/3; every class must occur.
    """
    values = np.asarray(values, np.float64)
    if values.ndim != 2:
        raise ValueError(f"values: expected [N, P] from measure(), got shape {values.shape}")
    labels = _check_labels(labels, values.shape[0])
    missing = sorted(set(range(NUM_CLASSES)) - set(labels.tolist()))
    if missing:
        raise ValueError(f"labels: classes {missing} do not occur, so their terciles are undefined")
    return np.stack([np.quantile(values[labels == k], [1 / 3, 2 / 3], axis=0).T for k in range(NUM_CLASSES)])


def levels(values: np.ndarray, labels: np.ndarray, thresholds: np.ndarray = DIGITS_THRESHOLDS) -> np.ndarray:
    """Levels int8 [N, P] in {-1, 0, +1}: below the class's lower tercile, between, above the upper."""
    values = np.asarray(values, np.float64)
    labels = _check_labels(labels, values.shape[0])
    bounds = np.asarray(thresholds)[labels]  # [N, P, 2]
    return ((values > bounds[..., 1]).astype(np.int8) - (values < bounds[..., 0]).astype(np.int8)).astype(np.int8)


def relative(values: np.ndarray, labels: np.ndarray, thresholds: np.ndarray = DIGITS_THRESHOLDS) -> np.ndarray:
    """`values` [N, P] minus their class's midpoint between the terciles: the class-free part of a property."""
    values = np.asarray(values, np.float64)
    labels = _check_labels(labels, values.shape[0])
    return values - np.asarray(thresholds)[labels].mean(axis=-1)


def follows_levels(
    images: np.ndarray,
    labels: np.ndarray,
    requested: np.ndarray,
    thresholds: np.ndarray = DIGITS_THRESHOLDS,
) -> dict[str, dict[str, float]]:
    """How well generated `images` follow the property levels their captions `requested` [N, P].

    For each property over the images whose caption asked for -1 or +1: 'accuracy', the fraction
    measured at the requested level (chance about 1/3 each); 'gap', the mean of the property
    relative to its class (`relative`) over the +1 requests minus over the -1 requests (0 when
    ignored; about 0.075 thickness / 0.18 slant on real digits); 'auc', the probability that a +1
    image measures above a -1 image, relative to class (0.5 when ignored). NaN where undefined.
    """
    values = measure(images)  # [N, P]
    requested = np.asarray(requested)
    if requested.shape != values.shape:
        raise ValueError(f"requested: expected shape {values.shape} (images, properties), got {requested.shape}")
    measured = levels(values, labels, thresholds)
    rel = relative(values, labels, thresholds)
    report = {}
    for p, name in enumerate(PROPERTIES):
        asked = requested[:, p] != 0
        high, low = rel[requested[:, p] == 1, p], rel[requested[:, p] == -1, p]
        both = high.size and low.size
        report[name] = {
            "accuracy": float(np.mean(measured[asked, p] == requested[asked, p])) if asked.any() else float("nan"),
            "gap": float(high.mean() - low.mean()) if both else float("nan"),
            "auc": float(np.mean(high[:, None] > low[None, :]) + 0.5 * np.mean(high[:, None] == low[None, :]))
            if both
            else float("nan"),
        }
    return report


# ---------------------------------------------------------------------------------------------
# Captions


def _as_properties(properties: Mapping[str, str | int | None] | Sequence[int] | np.ndarray) -> dict[str, str]:
    """{'thickness': 'thick', ...} from level words, levels -1/0/+1 by name, or a row of `levels`."""
    if not isinstance(properties, Mapping):
        row = np.asarray(properties)
        if row.shape != (len(PROPERTIES),):
            raise ValueError(f"properties: expected a mapping or {len(PROPERTIES)} levels, got {properties!r}")
        properties = dict(zip(PROPERTIES, row.tolist(), strict=True))
    unknown = set(properties) - set(PROPERTIES)
    if unknown:
        raise ValueError(f"properties: unknown {sorted(unknown)}; allowed {list(PROPERTIES)}")
    words = {}
    for name, level in properties.items():
        if level is None or (not isinstance(level, str) and int(level) == 0):
            continue
        if not isinstance(level, str):
            if int(level) not in (-1, 1):
                raise ValueError(f"properties[{name!r}]: level must be -1, 0 or 1, got {level}")
            level = LEVELS[name][(int(level) + 1) // 2]
        if level not in LEVELS[name]:
            raise ValueError(f"properties[{name!r}]: {level!r} is not one of {LEVELS[name]}")
        words[name] = level
    return words


def _fix_articles(text: str) -> str:
    """'a eight' -> 'an eight', 'a 8' -> 'an 8' ('a one' stays)."""
    return re.sub(r"\ba (?=(eight|8)\b)", "an ", text)


def all_captions(label: int, properties: Mapping[str, str | int | None] | Sequence[int] | None = None) -> list[str]:
    """Every caption the templates make for `label` with `properties` mentioned, in a fixed order.

    `properties` maps a property to its level word (LEVELS), or -1/+1; 0, None or absent leave it
    unmentioned. The number is written as a word or as a digit.
    """
    if not 0 <= int(label) < NUM_CLASSES:
        raise ValueError(f"label: expected 0..{NUM_CLASSES - 1}, got {label}")
    words = _as_properties({} if properties is None else properties)
    return list(_captions(int(label), words.get("thickness"), words.get("slant")))


@functools.cache
def _captions(label: int, thickness_level: str | None, slant_level: str | None) -> tuple[str, ...]:
    """`all_captions` for one label and level words (None: not mentioned), memoised."""
    thick = _THICKNESS[thickness_level] if thickness_level else {"adj": ("",), "adv": ("",)}
    side = _SLANT[slant_level] if slant_level else {"phrase": ("",), "dir": ("",)}
    captions = []
    for template in _TEMPLATES[thickness_level is not None, slant_level is not None]:
        for n, (adj, adv), (phrase, dir_) in itertools.product(
            (NUMBER_WORDS[label], str(label)),
            zip(thick["adj"], thick["adv"], strict=True),
            itertools.product(side["phrase"], side["dir"]),
        ):
            text = template.format(a="a", n=n, adj=adj, adv=adv, phrase=phrase, dir=dir_)
            captions.append(_fix_articles(text))
    return tuple(dict.fromkeys(captions))  # drop duplicates (templates without some slot), keep order


def caption(
    label: int,
    properties: Mapping[str, str | int | None] | Sequence[int],
    rng_or_template_index: np.random.Generator | int,
) -> str:
    """One caption of `label` with `properties` (as `all_captions`): "a thick seven", "a 7, written boldly".

    An int picks `all_captions(label, properties)[index % count]`; a numpy Generator picks one
    uniformly (template, number as word or digit, synonyms), so captions are deterministic for a seed.
    """
    options = all_captions(label, properties)
    if isinstance(rng_or_template_index, np.random.Generator):
        return options[int(rng_or_template_index.integers(len(options)))]
    if isinstance(rng_or_template_index, (int, np.integer)):
        return options[int(rng_or_template_index) % len(options)]
    raise ValueError(
        f"rng_or_template_index: expected a numpy Generator or an int, got {type(rng_or_template_index).__name__}"
    )


def parse_caption(text: str) -> tuple[int | None, dict[str, str]]:
    """(label, {property: level word}) read back from a caption's words; label None if it names none.

    Inverts `caption` (tests check every template) and reads free prompts built from the same
    words, e.g. to know which levels a prompt asked for when checking samples.
    """
    label, found = None, {}
    lookup = {w: k for k, w in enumerate(NUMBER_WORDS)} | {str(k): k for k in range(NUM_CLASSES)}
    thickness_words = {w: level for level, forms in _THICKNESS.items() for f in forms.values() for w in f}
    for word in tokenize(text):
        if word in lookup and label is None:
            label = lookup[word]
        elif word in thickness_words:
            found["thickness"] = thickness_words[word]
        elif word in ("left", "right"):
            found["slant"] = word
    return label, found


# ---------------------------------------------------------------------------------------------
# Tokens


def tokenize(text: str) -> list[str]:
    """Lower-cased words, digits and punctuation marks: "A 7, slanted" -> ['a', '7', ',', 'slanted']."""
    return _TOKEN_RE.findall(text.lower())


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """A word-level vocabulary: id 0 is <pad>, 1 is <unk>, then `words` in their given order."""

    words: tuple[str, ...]

    PAD = "<pad>"
    UNK = "<unk>"
    pad_id = 0
    unk_id = 1

    def __post_init__(self):
        if len(set(self.words)) != len(self.words) or {self.PAD, self.UNK} & set(self.words):
            raise ValueError("words: must be distinct and exclude <pad> and <unk>")

    @functools.cached_property
    def tokens(self) -> tuple[str, ...]:
        """All tokens by id: ('<pad>', '<unk>', *words)."""
        return (self.PAD, self.UNK, *self.words)

    @functools.cached_property
    def _ids(self) -> dict[str, int]:
        return {token: i for i, token in enumerate(self.tokens)}

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def size(self) -> int:
        """Number of ids, the text encoder's `vocab_size`."""
        return len(self.tokens)

    def encode(self, texts: Iterable[str], max_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Texts -> (tokens int32 [B, L], mask bool [B, L]), left-aligned, padded with <pad> = 0.

        Unknown words become <unk>. `max_len` None: L is the longest text's length; a text longer
        than `max_len` raises ValueError (never truncates silently).
        """
        rows = [[self._ids.get(word, self.unk_id) for word in tokenize(text)] for text in texts]
        longest = max((len(r) for r in rows), default=0)
        if max_len is None:
            max_len = longest
        elif max_len < longest:
            raise ValueError(f"max_len={max_len} is shorter than the longest text ({longest} tokens)")
        tokens = np.zeros((len(rows), max_len), np.int32)
        for i, row in enumerate(rows):
            tokens[i, : len(row)] = row
        mask = np.arange(max_len)[None, :] < np.array([len(r) for r in rows], np.int64).reshape(-1, 1)
        return tokens, mask

    def decode(self, tokens: np.ndarray, mask: np.ndarray | None = None) -> list[str]:
        """tokens [B, L] (mask [B, L]; None: all but <pad>) -> texts, punctuation attached to the word before."""
        tokens = np.asarray(tokens)
        if tokens.ndim != 2:
            raise ValueError(f"tokens: expected [B, L], got shape {tokens.shape}")
        mask = tokens != self.pad_id if mask is None else np.asarray(mask, bool)
        texts = []
        for row, keep in zip(tokens, mask, strict=True):
            text = " ".join(self.tokens[i] if 0 <= i < len(self) else self.UNK for i in row[keep])
            texts.append(re.sub(r" ([^\w\s<>])", r"\1", text))
        return texts


@functools.cache
def _caption_words() -> tuple[tuple[str, ...], int]:
    """The sorted words of every caption and the longest caption's length in tokens."""
    words, longest = set(), 0
    for label, row in itertools.product(range(NUM_CLASSES), itertools.product((-1, 0, 1), repeat=len(PROPERTIES))):
        for text in all_captions(label, row):
            tokens = tokenize(text)
            words.update(tokens)
            longest = max(longest, len(tokens))
    return tuple(sorted(words)), longest


@functools.cache
def vocabulary() -> Vocabulary:
    """The captions' vocabulary: <pad>, <unk>, then every word the templates use, sorted."""
    return Vocabulary(_caption_words()[0])


def max_caption_length() -> int:
    """Tokens in the longest caption the templates make (the default `max_len` of `caption_split`)."""
    return _caption_words()[1]


@dataclasses.dataclass(frozen=True)
class CaptionedSplit:
    """Captions of a split, row i for example i."""

    captions: list[str]
    tokens: np.ndarray  # int32 [N, L], ids of `vocabulary()`, <pad> = 0 after the caption
    mask: np.ndarray  # bool [N, L], True on real tokens
    levels: np.ndarray  # int8 [N, P], the measured levels the captions mention (0: not mentioned)
    values: np.ndarray  # float64 [N, P], the measured properties (`measure`)


def caption_split(
    images: np.ndarray,
    labels: np.ndarray,
    seed: int = 0,
    *,
    thresholds: np.ndarray = DIGITS_THRESHOLDS,
    max_len: int | None = None,
) -> CaptionedSplit:
    """Caption and tokenise a whole split: images [N, H, W, C] (uint8, or float in [-1, 1]), labels [N].

    Example i's caption mentions every property whose level is not 0 and is drawn by
    `caption(label_i, levels_i, rng)` with one `np.random.default_rng(seed)` walked in example
    order, so the result is a pure function of (images, labels, seed). `max_len` None: the longest
    caption any template makes (`max_caption_length()`), the same L for every split and seed.
    """
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images: expected [N, H, W, C], got shape {images.shape}")
    labels = _check_labels(labels, images.shape[0])
    values = measure(images)  # [N, P]
    lv = levels(values, labels, thresholds)  # [N, P]
    rng = np.random.default_rng(seed)
    captions = [caption(int(y), row, rng) for y, row in zip(labels, lv, strict=True)]
    tokens, mask = vocabulary().encode(captions, max_caption_length() if max_len is None else max_len)
    return CaptionedSplit(captions=captions, tokens=tokens, mask=mask, levels=lv, values=values)
