"""Attention, cross-attention and the SpatialTransformer (models/attention.py).

Tiny sizes (16 channels, 2 heads, 4x4 maps, context L=5 of width 12); one model shared by the
tests, built and run under jit, so the file runs in seconds.
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffusion_jax.models.attention import SpatialTransformer

C, HEADS, CTX_DIM, L = 16, 2, 12, 5
B, H, W = 2, 4, 4


def _normal(seed: int, *shape: int) -> jax.Array:
    """Standard normal float32 values from numpy (no JAX random program to compile)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _randomise(variable: nnx.Variable, seed: int) -> None:
    variable[...] = _normal(seed, *variable.shape)


def _jit_apply(model: nnx.Module) -> tuple[Callable, nnx.State]:
    """(apply, state) with apply(state, *args) = model(*args), jitted."""
    graphdef, state = nnx.split(model)
    return jax.jit(lambda state, *args: nnx.merge(graphdef, state)(*args)), state


@pytest.fixture(scope="module")
def inputs() -> tuple[jax.Array, jax.Array, jax.Array]:
    return _normal(0, B, H, W, C), _normal(1, B, L, CTX_DIM), _normal(2, B, L, CTX_DIM)


class Block(NamedTuple):
    model: SpatialTransformer  # proj_out randomised, so that the transformer branch shows in the output
    apply: Callable  # apply(state, x, context, context_mask), jitted
    state: nnx.State  # the model's state
    fresh_out: jax.Array  # the freshly built model's output on `inputs` (proj_out still zero)


@pytest.fixture(scope="module")
def block(inputs) -> Block:
    x, context, _ = inputs
    model = nnx.jit(lambda: SpatialTransformer(C, num_heads=HEADS, depth=1, context_dim=CTX_DIM, rngs=nnx.Rngs(0)))()
    apply, fresh_state = _jit_apply(model)
    fresh_out = apply(fresh_state, x, context, None)
    _randomise(model.proj_out.kernel, 3)
    _randomise(model.proj_out.bias, 4)
    return Block(model, apply, nnx.state(model), fresh_out)


def test_output_depends_on_context(block, inputs):
    x, context, other = inputs
    out_a = np.asarray(block.apply(block.state, x, context, None))
    out_b = np.asarray(block.apply(block.state, x, other, None))
    out_none = np.asarray(block.apply(block.state, x, None, None))
    assert out_a.shape == x.shape
    assert np.all(np.isfinite(out_a))
    assert np.abs(out_a - out_b).max() > 1e-2
    assert np.abs(out_a - out_none).max() > 1e-2


def test_empty_and_all_masked_context_equal_none(block, inputs):
    apply, state = block.apply, block.state
    x, context, _ = inputs
    out_none = np.asarray(apply(state, x, None, None))
    empty = jnp.zeros((B, 0, CTX_DIM))
    np.testing.assert_allclose(apply(state, x, empty, None), out_none, atol=1e-6, rtol=0)
    np.testing.assert_allclose(apply(state, x, empty, jnp.zeros((B, 0), bool)), out_none, atol=1e-6, rtol=0)
    np.testing.assert_allclose(apply(state, x, context, jnp.zeros((B, L), bool)), out_none, atol=1e-6, rtol=0)
    # Row by row: an all-masked row is unconditioned while its neighbour still sees its tokens.
    mixed = jnp.array([[False] * L, [True, True, True, False, False]])
    out_mixed = np.asarray(apply(state, x, context, mixed))
    np.testing.assert_allclose(out_mixed[0], out_none[0], atol=1e-6, rtol=0)
    assert np.abs(out_mixed[1] - out_none[1]).max() > 1e-2


def test_all_masked_row_has_finite_gradients(block):
    attn = block.model.transformer_blocks[0].attn2  # where a row without keys could turn into NaN
    tokens, context = _normal(5, B, 6, C), _normal(6, B, L, CTX_DIM)
    mask = jnp.array([[False] * L, [True, False, True, False, False]])

    @nnx.jit
    def grads(attn, tokens, context):
        return nnx.grad(lambda m, c: jnp.sum(m(tokens, c, mask) ** 2), argnums=(0, 1))(attn, context)

    param_grads, context_grad = grads(attn, tokens, context)
    leaves = jax.tree.leaves(nnx.state(param_grads, nnx.Param))
    assert leaves and all(np.all(np.isfinite(np.asarray(leaf))) for leaf in leaves)
    np.testing.assert_array_equal(np.asarray(context_grad[0]), 0.0)  # the unconditioned row ignores its context
    assert np.all(np.isfinite(np.asarray(context_grad))) and np.abs(np.asarray(context_grad[1])).max() > 0


def test_padded_tokens_change_nothing(block, inputs):
    apply, state = block.apply, block.state
    x, context, _ = inputs
    mask = np.array([[True, True, True, False, False], [True, False, True, False, True]])  # 3 real tokens a row
    garbage = 100.0 * np.random.default_rng(7).standard_normal(context.shape)
    padded = np.where(mask[:, :, None], np.asarray(context), garbage)  # padded positions changed arbitrarily
    short = np.stack([np.asarray(context)[i, np.flatnonzero(row)] for i, row in enumerate(mask)])  # [B, 3, D]
    out_short = apply(state, x, jnp.asarray(short), None)
    np.testing.assert_allclose(apply(state, x, jnp.asarray(padded), mask), out_short, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(apply(state, x, context, mask), out_short, atol=1e-5, rtol=1e-5)


def test_fresh_block_is_identity(block, inputs):
    x, _, _ = inputs
    np.testing.assert_array_equal(np.asarray(block.fresh_out), np.asarray(x))  # proj_out starts at zero


def _numpy_attention(x, context, mask, wq, wk, wv, wo, bo, heads):
    """softmax(Q K^T / sqrt(d)) V per head over the real keys only, then the output projection; float64."""
    x, context, wq, wk, wv, wo, bo = (np.asarray(a, np.float64) for a in (x, context, wq, wk, wv, wo, bo))
    d = wq.shape[1] // heads
    out = np.zeros((x.shape[0], x.shape[1], wo.shape[1]))
    for b in range(x.shape[0]):
        keep = np.flatnonzero(mask[b])
        if keep.size == 0:
            continue  # no real key: the attention adds nothing
        q, k, v = x[b] @ wq, context[b, keep] @ wk, context[b, keep] @ wv  # [T, N*d], [L', N*d], [L', N*d]
        per_head = []
        for n in range(heads):
            cols = slice(n * d, (n + 1) * d)
            logits = q[:, cols] @ k[:, cols].T / np.sqrt(d)  # [T, L']
            p = np.exp(logits - logits.max(axis=1, keepdims=True))
            per_head.append((p / p.sum(axis=1, keepdims=True)) @ v[:, cols])  # [T, d]
        out[b] = np.concatenate(per_head, axis=1) @ wo + bo
    return out


def test_attention_matches_numpy_softmax(block):
    attn = nnx.clone(block.model.transformer_blocks[0].attn2)  # Attention(16, context_dim=12, 2 heads of 8)
    assert (attn.num_heads, attn.head_dim) == (HEADS, 8)
    _randomise(attn.to_out[0].bias, 8)  # a non-zero bias: a masked row must drop it too
    x, context = _normal(9, B, 6, C), _normal(10, B, L, CTX_DIM)
    weights = [
        np.asarray(w[...])
        for w in (attn.to_q.kernel, attn.to_k.kernel, attn.to_v.kernel, attn.to_out[0].kernel, attn.to_out[0].bias)
    ]
    apply, state = _jit_apply(attn)
    mask = np.array([[True, False, True, True, False], [False] * L])  # the second row has no real key
    expected = _numpy_attention(x, context, mask, *weights, HEADS)
    np.testing.assert_allclose(apply(state, x, context, mask), expected, atol=1e-5, rtol=1e-5)
    assert np.abs(expected[0]).max() > 0.1
    full = np.ones((B, L), bool)
    expected = _numpy_attention(x, context, full, *weights, HEADS)
    np.testing.assert_allclose(apply(state, x, context, None), expected, atol=1e-5, rtol=1e-5)


def test_linear_projection_equals_conv_projection(block, inputs):
    """SD 2.x's Linear proj_in/proj_out compute the same map as SD 1.x's 1x1 convs."""
    x, context, _ = inputs

    def make() -> SpatialTransformer:
        return SpatialTransformer(C, num_heads=HEADS, context_dim=CTX_DIM, use_linear_projection=True, rngs=nnx.Rngs(0))

    graphdef, abstract = nnx.split(nnx.eval_shape(make))  # the Linear variant's structure, no initialisation
    conv_params = dict(nnx.to_flat_state(block.state))
    assert conv_params[("proj_in", "kernel")].shape == (1, 1, C, C)
    params = []
    for path, variable in nnx.to_flat_state(abstract):
        params.append((path, variable.replace(jnp.reshape(conv_params[path][...], variable.shape))))
    assert dict(params)[("proj_in", "kernel")].shape == (C, C)
    apply, _ = _jit_apply(nnx.merge(graphdef, nnx.from_flat_state(params)))
    np.testing.assert_allclose(
        apply(nnx.from_flat_state(params), x, context, None),
        block.apply(block.state, x, context, None),
        atol=1e-5,
        rtol=1e-5,
    )


def test_errors_name_the_field(block, inputs):
    model = block.model
    x, context, _ = inputs
    with pytest.raises(ValueError, match=r"context: width 32 != model.context_dim 12"):
        model(x, jnp.zeros((B, L, 32)))
    with pytest.raises(ValueError, match=r"^context_mask"):
        model(x, context, jnp.ones((B, L + 1), bool))
    with pytest.raises(ValueError, match=r"^context_mask"):
        model(x, None, jnp.ones((B, L), bool))
    with pytest.raises(ValueError, match=r"num_heads"):
        nnx.eval_shape(lambda: SpatialTransformer(C, num_heads=3, context_dim=CTX_DIM, rngs=nnx.Rngs(0)))
    no_cross = nnx.eval_shape(lambda: SpatialTransformer(C, num_heads=HEADS, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"^context: .*model.context_dim"):
        no_cross(x, context)


def test_parameter_paths_follow_diffusers(block):
    model = block.model
    paths = {".".join(map(str, path)) for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    for expected in (
        "norm.scale",
        "norm.bias",
        "proj_in.kernel",
        "proj_out.kernel",
        "proj_out.bias",
        "transformer_blocks.0.norm1.scale",
        "transformer_blocks.0.attn1.to_q.kernel",
        "transformer_blocks.0.attn1.to_out.0.kernel",
        "transformer_blocks.0.attn1.to_out.0.bias",
        "transformer_blocks.0.norm2.scale",
        "transformer_blocks.0.attn2.to_k.kernel",
        "transformer_blocks.0.attn2.to_v.kernel",
        "transformer_blocks.0.norm3.scale",
        "transformer_blocks.0.ff.net.0.proj.kernel",
        "transformer_blocks.0.ff.net.2.kernel",
    ):
        assert expected in paths, expected
    assert not any(p.endswith(("to_q.bias", "to_k.bias", "to_v.bias")) for p in paths)  # no q/k/v bias, as LDM
    assert model.transformer_blocks[0].attn2.to_k.kernel.shape == (CTX_DIM, C)
    assert model.transformer_blocks[0].ff.net[0].proj.kernel.shape == (C, 2 * 4 * C)  # GEGLU: value and gate
