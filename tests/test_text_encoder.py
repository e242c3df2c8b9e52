"""Tests for diffusion_jax.models.text: the transformer text encoder τ_θ (LDM §3.3), at tiny widths.

Every call goes through one `nnx.jit` (`forward`): op-by-op eager execution costs seconds here.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffusion_jax.data import captions as C
from diffusion_jax.models.text import TextEncoder

WIDTH, DEPTH, HEADS = 16, 2, 2


@nnx.jit
def forward(model: TextEncoder, tokens: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    return model(tokens, mask)


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return TextEncoder(C.vocabulary().size, C.max_caption_length(), WIDTH, DEPTH, HEADS, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def batch() -> tuple[np.ndarray, np.ndarray]:
    texts = ["a thick seven", "the digit 2 in fine strokes, leaning left", "an eight", "a 4 that leans to the right",
             "a thin seven"]  # fmt: skip
    return C.vocabulary().encode(texts, C.max_caption_length())  # numpy: no eager jax ops in the tests


def test_shapes_and_padding_is_zero(encoder, batch):
    tokens, mask = batch
    context, pooled = map(np.asarray, forward(encoder, tokens, mask))
    assert context.shape == (5, C.max_caption_length(), WIDTH) and pooled.shape == (5, WIDTH)
    assert context.dtype == pooled.dtype == jnp.float32
    assert np.all(context[~mask] == 0)
    np.testing.assert_allclose(pooled, context.sum(1) / mask.sum(1, keepdims=True), rtol=1e-5, atol=1e-6)
    assert np.all(np.linalg.norm(context[mask], axis=-1) > 1)  # LayerNorm'd real tokens
    # A sequence shorter than max_len works; a row without real tokens gives zeros, not NaN.
    short_context, short_pooled = forward(encoder, tokens[:, :3], np.zeros((5, 3), bool))
    assert short_context.shape == (5, 3, WIDTH) and not np.any(short_context) and not np.any(short_pooled)


def test_padded_tokens_change_nothing(encoder, batch):
    tokens, mask = batch
    noise = np.random.default_rng(1).integers(0, C.vocabulary().size, tokens.shape, np.int32)
    garbage = np.where(mask, tokens, noise)  # other ids at every padded position
    assert np.any(garbage != tokens)
    context, pooled = forward(encoder, tokens, mask)
    context2, pooled2 = forward(encoder, garbage, mask)
    np.testing.assert_allclose(context2, context, atol=1e-6)
    np.testing.assert_allclose(pooled2, pooled, atol=1e-6)
    # The mask does matter: declaring the padding real changes the real positions too.
    context3, _ = forward(encoder, garbage, np.ones(mask.shape, bool))
    assert not np.allclose(np.asarray(context3)[np.asarray(mask)], np.asarray(context)[np.asarray(mask)], atol=1e-3)


def test_different_captions_differ(encoder, batch):
    tokens, mask = batch
    context, pooled = forward(encoder, tokens, mask)
    # "a thick seven" vs "a thin seven" (rows 0 and 4): one word apart, every position changes through attention.
    assert np.all(np.abs(np.asarray(context[4, :3]) - np.asarray(context[0, :3])).max(-1) > 1e-3)
    distances = np.linalg.norm(np.asarray(pooled)[:, None] - np.asarray(pooled)[None], axis=-1)
    assert np.all(distances[~np.eye(len(pooled), dtype=bool)] > 1e-3)


def test_jit_of_the_pure_function_and_gradients(encoder, batch):
    """The functional form a train step uses (split state, `jax.jit`, merge) agrees with `nnx.jit`."""
    tokens, mask = batch
    graphdef, state = nnx.split(encoder)
    pure = jax.jit(lambda state, t, m: nnx.merge(graphdef, state)(t, m))
    for a, b in zip(pure(state, tokens, mask), forward(encoder, tokens, mask), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    grads = nnx.jit(nnx.grad(lambda model: jnp.sum(model(tokens, mask)[1] ** 2)))(encoder)
    norms = {"/".join(map(str, path)): np.linalg.norm(np.asarray(g)) for path, g in nnx.to_flat_state(grads)}
    assert norms["pos_embed"] > 0 and norms["blocks/0/attn/qkv/kernel"] > 0
    # Ids that never occur get no gradient: the <unk> row (absent from the batch).
    assert not np.any(np.asarray(grads["token_embed"]["embedding"])[C.vocabulary().unk_id])


def test_bfloat16_compute_stays_close(encoder, batch):
    tokens, mask = batch
    low = TextEncoder(C.vocabulary().size, C.max_caption_length(), WIDTH, DEPTH, HEADS, dtype=jnp.bfloat16,
                      rngs=nnx.Rngs(0))  # fmt: skip
    context, _ = forward(encoder, tokens, mask)
    context_low, _ = forward(low, tokens, mask)
    assert context_low.dtype == jnp.float32
    np.testing.assert_allclose(context_low, context, atol=0.1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(vocab_size=0), "vocab_size"),
        (dict(max_len=0), "max_len"),
        (dict(width=10, num_heads=4), "num_heads"),
        (dict(depth=-1), "depth"),
        (dict(num_heads=0), "num_heads"),
    ],
)
def test_constructor_errors_name_the_argument(kwargs, match):
    args = dict(vocab_size=10, max_len=4, width=8, depth=1, num_heads=2) | kwargs
    with pytest.raises(ValueError, match=match):
        TextEncoder(**args, rngs=nnx.Rngs(0))


def test_call_errors_name_the_argument(encoder, batch):
    tokens, mask = batch
    with pytest.raises(ValueError, match="max_len"):
        too_long = C.max_caption_length() + 1
        forward(encoder, np.zeros((1, too_long), np.int32), np.ones((1, too_long), bool))
    with pytest.raises(ValueError, match="mask"):
        forward(encoder, tokens, mask[:, :3])
    with pytest.raises(ValueError, match="tokens"):
        forward(encoder, tokens.astype(jnp.float32), mask)
