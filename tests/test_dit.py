"""Tests for diffusion_jax.models.dit: DiT (Peebles & Xie 2023, arXiv 2212.09748).

The paper-sized models are checked abstractly (`nnx.eval_shape`, lowering without compiling):
their parameter counts and forward Gflops against Table 4. Numerics use tiny DiTs.
"""

import functools
import math

import jax
import jax.extend.core
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import tiny_digits_config
from flax import nnx

from diffusion_jax import conditioning, models
from diffusion_jax.errors import ConfigError
from diffusion_jax.models import dit
from diffusion_jax.models.dit import DiT, DiTBlock, get_2d_sincos_pos_embed
from diffusion_jax.training.setup import build_model, model_apply

# 256x256 ImageNet through the paper's VAE: 32x32x4 latents, 1000 classes, learned variance (§4).
IMAGENET_256 = dict(image_size=32, in_channels=4, num_classes=1000, learn_sigma=True)
# Table 4: params (millions, as rounded there) and forward Gflops of the p = 2 models.
TABLE4 = {"DiT-S/2": (33, 6.06), "DiT-B/2": (130, 23.01), "DiT-L/2": (458, 80.71), "DiT-XL/2": (675, 118.64)}
SIZES = {"DiT-S/2": (12, 384), "DiT-B/2": (12, 768), "DiT-L/2": (24, 1024), "DiT-XL/2": (28, 1152)}  # depth, d

TINY = dict(image_size=8, in_channels=3, patch_size=2, hidden_size=64, depth=2, num_heads=4, num_classes=5,
            learn_sigma=True)
B = 4


def _dit_param_count(depth: int, d: int, p: int, c_in: int, c_out: int, num_classes: int) -> int:
    """DiT's parameters by hand: weights + biases of every layer (mlp_ratio 4, 256-wide frequency embedding)."""
    m = 4 * d
    patch_embed = p * p * c_in * d + d
    t_embed = (256 * d + d) + (d * d + d)
    y_embed = (num_classes + 1) * d  # with the null-label row
    block = (d * 3 * d + 3 * d) + (d * d + d) + (d * m + m) + (m * d + d) + (d * 6 * d + 6 * d)  # qkv, proj, mlp, adaLN
    final = (d * 2 * d + 2 * d) + (d * p * p * c_out + p * p * c_out)  # adaLN, linear
    return patch_embed + t_embed + y_embed + depth * block + final


@pytest.mark.parametrize("name", list(TABLE4))
def test_param_counts_match_table4(name):
    n = models.count_params(lambda: models.create(name, rngs=nnx.Rngs(0), **IMAGENET_256))
    depth, d = SIZES[name]
    assert n == _dit_param_count(depth, d, p=2, c_in=4, c_out=8, num_classes=1000)
    assert round(n / 1e6) == TABLE4[name][0]
    if name == "DiT-XL/2":  # the official repo prints 675,129,632, counting its frozen 256x1152 position embedding
        assert n + 256 * 1152 == 675_129_632


@functools.cache
def _abstract(name: str) -> nnx.Module:
    return nnx.eval_shape(lambda: models.create(name, rngs=nnx.Rngs(0), **IMAGENET_256))


@pytest.mark.parametrize("name", list(TABLE4))
def test_forward_gflops_match_table4(name):
    """XLA's cost analysis of the lowered (not compiled) forward pass of one class-conditional latent.

    XLA counts a multiply-add as 2 flops; the paper's Gflops (fvcore) count it as 1, so the
    paper's figure is half of XLA's. XLA also counts the elementwise work (LayerNorm,
    modulation, GELU, softmax), which fvcore skips: +0.3% (XL/2) to +0.7% (S/2).
    """
    graphdef, state = nnx.split(_abstract(name))
    forward = jax.jit(lambda s, x, t, y: nnx.merge(graphdef, s)(x, t, y))
    lowered = forward.lower(
        state,
        jax.ShapeDtypeStruct((1, 32, 32, 4), jnp.float32),
        jax.ShapeDtypeStruct((1,), jnp.int32),
        jax.ShapeDtypeStruct((1,), jnp.int32),
    )
    gflops = lowered.cost_analysis()["flops"] / 2 / 1e9
    assert gflops == pytest.approx(TABLE4[name][1], rel=0.01)


def test_all_variants_registered_with_table1_sizes():
    for size in ("S", "B", "L", "XL"):
        for p in (2, 4, 8):
            assert f"DiT-{size}/{p}" in models.names()
    assert "dit" in models.names()
    model = nnx.eval_shape(lambda: models.create("DiT-B/8", rngs=nnx.Rngs(0), image_size=16, in_channels=4))
    assert len(model.blocks) == 12
    assert model.x_embedder.kernel.shape == (8, 8, 4, 768)
    assert model.blocks[0].attn.num_heads == 12


def test_variant_rejects_a_conflicting_size():
    with pytest.raises(ConfigError, match=r"model\.patch_size: DiT-S/2 has patch_size=2, got 4; .*model\.name='dit'"):
        models.create("DiT-S/2", rngs=nnx.Rngs(0), image_size=32, in_channels=4, patch_size=4)
    same = nnx.eval_shape(lambda: models.create("DiT-S/2", rngs=nnx.Rngs(0), image_size=8, in_channels=4,
                                                patch_size=2))
    assert same.patch_size == 2
    with pytest.raises(ConfigError, match=r"model\.name: unknown DiT variant 'DiT-XXL/2'; choose one of: DiT-S/2, "):
        dit.variant("DiT-XXL/2")


def _init(seed: int = 0, **kwargs) -> nnx.Module:
    """A DiT with its real initialisation, drawn in one jitted function."""
    def make(key):
        return DiT(**kwargs, rngs=nnx.Rngs(key))

    graphdef, _ = nnx.split(nnx.eval_shape(lambda: make(jax.random.key(0))))
    state = jax.jit(lambda key: nnx.state(make(key)))(jax.random.key(seed))
    return nnx.merge(graphdef, state)


def _random_state(state: nnx.State, seed: int) -> nnx.State:
    """Every parameter of `state` redrawn with fan-in scaling: no layer is zero and activations stay O(1)."""
    rng = np.random.default_rng(seed)

    def draw(p):
        std = 1 / math.sqrt(math.prod(p.shape[:-1])) if len(p.shape) > 1 else 0.1
        return jnp.asarray(std * rng.standard_normal(p.shape), jnp.float32)

    return jax.tree.map(draw, state)


def _forward(graphdef: nnx.GraphDef):
    return jax.jit(lambda state, x, t, y: nnx.merge(graphdef, state)(x, t, y))


@pytest.fixture(scope="module")
def inputs():
    kx, kt, ky = jax.random.split(jax.random.key(7), 3)
    x = jax.random.normal(kx, (B, 8, 8, 3))
    t = jax.random.randint(kt, (B,), 0, 1000)
    y = jax.random.randint(ky, (B,), 0, TINY["num_classes"])
    return x, t, y


def test_initialisation_follows_official_initialize_weights():
    """xavier_uniform linears, patch-embed conv xavier on its [p*p*C, d] matrix, N(0, 0.02^2)
    label table and timestep MLP, zero biases, zero adaLN and final layer."""
    model = _init(image_size=16, in_channels=3, patch_size=4, hidden_size=64, depth=1, num_heads=4, num_classes=99)
    conv = np.asarray(model.x_embedder.kernel[...])  # [4, 4, 3, 64]
    bound = math.sqrt(6 / (4 * 4 * 3 + 64))  # flax's own xavier on this kernel would use fan_out 4*4*64
    assert conv.shape == (4, 4, 3, 64) and 0.95 * bound < np.abs(conv).max() <= bound
    qkv = np.asarray(model.blocks[0].attn.qkv.kernel[...])  # [64, 192]
    bound = math.sqrt(6 / (64 + 192))
    assert 0.95 * bound < np.abs(qkv).max() <= bound
    assert np.asarray(model.cond.label.embed.embedding[...]).shape == (100, 64)  # 99 classes + null
    for table in (model.cond.label.embed.embedding, model.cond.time.dense0.kernel, model.cond.time.dense1.kernel):
        w = np.asarray(table[...])
        assert abs(w.mean()) < 0.002 and w.std() == pytest.approx(0.02, rel=0.1)
    for layer in (model.blocks[0].adaln_modulation, model.final_layer.adaln_modulation, model.final_layer.linear):
        assert not np.any(np.asarray(layer.kernel[...]))
    biases = [p for path, p in nnx.to_flat_state(nnx.state(model, nnx.Param)) if path[-1] == "bias"]
    assert len(biases) == 10 and not any(np.any(np.asarray(b[...])) for b in biases)


@pytest.fixture(scope="module")
def tiny():
    """The TINY DiT freshly initialised: (graphdef, state, jitted forward(state, x, t, y))."""
    graphdef, state = nnx.split(_init(**TINY))
    return graphdef, state, _forward(graphdef)


def _with_final_linear(graphdef: nnx.GraphDef, state: nnx.State, kernel: np.ndarray, bias: np.ndarray) -> nnx.State:
    model = nnx.merge(graphdef, state)
    model.final_layer.linear.kernel.set_value(jnp.asarray(kernel, jnp.float32))
    model.final_layer.linear.bias.set_value(jnp.asarray(bias, jnp.float32))
    return nnx.state(model)


def test_fresh_dit_outputs_zero_until_the_final_layer_changes(tiny, inputs):
    """adaLN-Zero (§3.2): every gate and the final layer start at zero, so the output is exactly 0."""
    graphdef, state, f = tiny
    x, t, y = inputs
    for x_, t_, y_ in [(x, t, y), (3 * x + 1, 999 - t, jnp.array([5, 0, 5, 4]))]:  # 5: the null label
        out = f(state, x_, t_, y_)
        assert out.shape == (B, 8, 8, 6) and not np.any(np.asarray(out))
    assert not np.any(np.asarray(f(state, x, t, None)))
    rng = np.random.default_rng(3)
    perturbed = _with_final_linear(graphdef, state, 0.1 * rng.standard_normal((64, 24)), np.zeros(24))
    out = np.asarray(f(perturbed, x, t, y))
    assert np.all(np.isfinite(out)) and np.abs(out).min() > 0


def test_new_dit_is_final_layer_of_patches_plus_position_embedding(tiny, inputs):
    """At init the blocks are the identity, so DiT(x) = unpatchify(LN(patch_embed(x) + pos) @ W + b).

    Checked against numpy with the patch order, position embedding and unpatchify order of the
    official code (token i * w + j is the patch at row i, column j; features (row, column, channel)).
    """
    graphdef, state, f = tiny
    x, t, y = inputs
    p, g, d, c_out = 2, 4, 64, 6
    rng = np.random.default_rng(0)
    w, b = rng.standard_normal((d, p * p * c_out)), rng.standard_normal(p * p * c_out)
    out = np.asarray(f(_with_final_linear(graphdef, state, w, b), x, t, y))

    model = nnx.merge(graphdef, state)
    xn = np.asarray(x, np.float64)
    patches = xn.reshape(B, g, p, g, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(B, g * g, p * p * 3)
    kernel = np.asarray(model.x_embedder.kernel[...], np.float64).reshape(p * p * 3, d)
    tokens = patches @ kernel + np.asarray(model.x_embedder.bias[...]) + get_2d_sincos_pos_embed(d, g)
    normed = (tokens - tokens.mean(-1, keepdims=True)) / np.sqrt(tokens.var(-1, keepdims=True) + 1e-6)
    decoded = normed @ w + b  # [B, T, p*p*C']
    expected = np.zeros((B, 8, 8, c_out))
    for i in range(g):
        for j in range(g):
            for a in range(p):
                for q in range(p):
                    for c in range(c_out):
                        expected[:, i * p + a, j * p + q, c] = decoded[:, i * g + j, (a * p + q) * c_out + c]
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def _numpy_block(x: np.ndarray, c: np.ndarray, w: dict, heads: int) -> np.ndarray:
    """An adaLN-Zero DiT block in float64 numpy, written from the paper (§3.2) and the official `DiTBlock`."""
    b, t, d = x.shape

    def layer_norm(v):
        return (v - v.mean(-1, keepdims=True)) / np.sqrt(v.var(-1, keepdims=True) + 1e-6)

    def gelu_tanh(u):
        return 0.5 * u * (1 + np.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u**3)))

    mod = (c / (1 + np.exp(-c))) @ w["adaln_modulation.kernel"] + w["adaln_modulation.bias"]  # SiLU, then [B, 6D]
    shift1, scale1, gate1, shift2, scale2, gate2 = np.split(mod[:, None, :], 6, axis=-1)
    h = layer_norm(x) * (1 + scale1) + shift1
    qkv = (h @ w["attn.qkv.kernel"] + w["attn.qkv.bias"]).reshape(b, t, 3, heads, d // heads)
    q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))  # [B, heads, T, D/heads]
    logits = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d // heads)
    attn = np.exp(logits - logits.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)
    o = (attn @ v).transpose(0, 2, 1, 3).reshape(b, t, d)
    x = x + gate1 * (o @ w["attn.proj.kernel"] + w["attn.proj.bias"])
    h = layer_norm(x) * (1 + scale2) + shift2
    m = gelu_tanh(h @ w["mlp.fc1.kernel"] + w["mlp.fc1.bias"]) @ w["mlp.fc2.kernel"] + w["mlp.fc2.bias"]
    return x + gate2 * m


def test_block_matches_a_numpy_reference():
    """Attention heads, tanh-GELU MLP and the six adaLN outputs (shift, scale, gate for each branch)."""
    block = nnx.eval_shape(lambda: DiTBlock(16, 2, 4.0, attention_impl=None, rngs=nnx.Rngs(0), dtype=jnp.float32))
    graphdef, state = nnx.split(block)
    state = _random_state(state, seed=4)
    weights = {".".join(map(str, path)): np.asarray(p[...], np.float64) for path, p in nnx.to_flat_state(state)}
    rng = np.random.default_rng(5)
    x, c = rng.standard_normal((2, 5, 16)), rng.standard_normal((2, 16))
    out = jax.jit(lambda s, x, c: nnx.merge(graphdef, s)(x, c))(state, jnp.asarray(x, jnp.float32),
                                                                 jnp.asarray(c, jnp.float32))
    np.testing.assert_allclose(np.asarray(out), _numpy_block(x, c, weights, heads=2), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("grid, dim", [(4, 16), (16, 1152)])
def test_position_embedding_closed_form(grid, dim):
    """MAE / DiT 2-D sin-cos: token (row i, col j): [sin(j w), cos(j w), sin(i w), cos(i w)], w_k = 10000^(-4k/d)."""
    emb = get_2d_sincos_pos_embed(dim, grid)
    assert emb.shape == (grid * grid, dim) and emb.dtype == np.float32
    quarter = dim // 4
    for i, j, k in [(0, 0, 0), (1, 2, 0), (3, 1, quarter - 1), (grid - 1, 0, 1), (2, grid - 1, quarter // 2)]:
        omega = 10000 ** (-k / quarter)
        row = emb[i * grid + j]
        expected = [math.sin(j * omega), math.cos(j * omega), math.sin(i * omega), math.cos(i * omega)]
        np.testing.assert_allclose(row[[k, quarter + k, 2 * quarter + k, 3 * quarter + k]], expected, atol=1e-6)


def test_position_embedding_is_not_a_parameter():
    model = nnx.eval_shape(lambda: DiT(**TINY, rngs=nnx.Rngs(0)))
    _, params, rest = nnx.split(model, nnx.Param, ...)
    assert jax.tree.leaves(rest) == []
    shapes = [p.shape for p in jax.tree.leaves(params)]
    assert (16, 64) not in shapes and (1, 16, 64) not in shapes  # T x d
    assert sum(math.prod(s) for s in shapes) == _dit_param_count(2, 64, p=2, c_in=3, c_out=6, num_classes=5)


@pytest.mark.parametrize("patch_size", [2, 4, 8])
@pytest.mark.parametrize("learn_sigma", [False, True])
def test_output_shapes(patch_size, learn_sigma):
    model = nnx.eval_shape(lambda: DiT(image_size=16, in_channels=3, patch_size=patch_size, hidden_size=32, depth=1,
                                       num_heads=2, num_classes=10, learn_sigma=learn_sigma, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    out = jax.eval_shape(
        lambda s, x, t, y: nnx.merge(graphdef, s)(x, t, y),
        state, jnp.zeros((2, 16, 16, 3)), jnp.zeros((2,), jnp.int32), jnp.zeros((2,), jnp.int32),
    )
    assert out.shape == (2, 16, 16, 6 if learn_sigma else 3) and out.dtype == jnp.float32


def test_cond_none_is_the_null_label(tiny, inputs):
    _, state, f = tiny
    x, t, y = inputs
    state = _random_state(state, seed=1)
    unconditional = f(state, x, t, None)
    np.testing.assert_array_equal(unconditional, f(state, x, t, jnp.full((B,), TINY["num_classes"])))
    assert not np.allclose(unconditional, f(state, x, t, y), atol=1e-3)


def test_labels_on_unconditional_dit():
    graphdef, state = nnx.split(nnx.eval_shape(lambda: DiT(**{**TINY, "num_classes": None}, rngs=nnx.Rngs(0))))
    with pytest.raises(ValueError, match=r"model\.num_classes"):
        jax.eval_shape(lambda s: nnx.merge(graphdef, s)(jnp.zeros((B, 8, 8, 3)), jnp.zeros((B,), jnp.int32),
                                                        jnp.zeros((B,), jnp.int32)), state)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(image_size=10, patch_size=4), r"model\.patch_size: 4 does not divide data\.image_size=10; "
                                            r"use one of 1, 2, 5, 10$"),
        (dict(hidden_size=30, num_heads=2), r"model\.hidden_size: 30 is not a positive multiple of 4.*"
                                            r"use e\.g\. 28 or 32"),
        (dict(num_heads=0), r"model\.num_heads: 0 does not divide"),
        (dict(hidden_size=32, num_heads=3), r"model\.num_heads: 3 does not divide model\.hidden_size=32; "
                                            r"use one of 1, 2, 4, 8, 16, 32"),
        (dict(attention_impl="flash"), r"model\.attention_impl: got 'flash'; choose None, 'xla' or 'cudnn'"),
        (dict(dtype="int32"), r"model\.dtype: got int32"),
    ],
)
def test_config_errors(kwargs, message):
    args = dict(image_size=8, in_channels=3, hidden_size=32, depth=1, num_heads=2) | kwargs
    with pytest.raises(ConfigError, match=message):
        DiT(**args, rngs=nnx.Rngs(0))


def _dot_dtypes(jaxpr: jax.extend.core.Jaxpr) -> list[str]:
    """The operand dtype of every matmul (a dot_general contracting more than one element) in `jaxpr` and its
    sub-jaxprs; the outer products that `models.bias` broadcasts biases with contract one and are not counted."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contracting, _), _ = eqn.params["dimension_numbers"]
            if math.prod(eqn.invars[0].aval.shape[d] for d in contracting) > 1:
                found.append(str(jnp.result_type(*(v.aval.dtype for v in eqn.invars))))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += _dot_dtypes(sub)
    return found


def test_bfloat16_compute_is_close_to_float32(tiny, inputs):
    _, state, f32 = tiny
    x, t, y = inputs
    bf16 = nnx.eval_shape(lambda: DiT(**TINY, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    assert {p.dtype for p in jax.tree.leaves(nnx.state(bf16, nnx.Param))} == {jnp.dtype(jnp.float32)}
    state = _random_state(state, seed=2)
    graphdef16 = nnx.graphdef(bf16)
    # Every matmul in bf16 (per block: qkv, QK^T, AV, proj, fc1, fc2, adaLN; the timestep MLP)
    # except the final layer's two, which stay float32.
    jaxpr = jax.make_jaxpr(lambda s: nnx.merge(graphdef16, s)(x, t, y))(state)
    dtypes = _dot_dtypes(jaxpr.jaxpr)
    assert dtypes.count("bfloat16") == 7 * TINY["depth"] + 2 and dtypes.count("float32") == 2
    out32 = f32(state, x, t, y)
    out16 = _forward(graphdef16)(state, x, t, y)
    assert out16.dtype == jnp.float32
    rel = float(jnp.linalg.norm(out16 - out32) / jnp.linalg.norm(out32))
    assert 0 < rel < 2e-2


def _remat_count(jaxpr: jax.extend.core.Jaxpr) -> int:
    return sum(eqn.primitive.name in ("remat2", "checkpoint") for eqn in jaxpr.eqns)


def test_remat_gives_identical_gradients(tiny, inputs):
    _, state, _ = tiny
    x, t, y = inputs
    plain = nnx.eval_shape(lambda: DiT(**TINY, rngs=nnx.Rngs(0)))
    remat = nnx.eval_shape(lambda: DiT(**TINY, remat=True, rngs=nnx.Rngs(0)))
    state = _random_state(state, seed=3)

    def loss(graphdef):
        return lambda s: jnp.mean(nnx.merge(graphdef, s)(x, t, y) ** 2)

    for model, count in [(plain, 0), (remat, TINY["depth"])]:
        jaxpr = jax.make_jaxpr(loss(nnx.graphdef(model)))(state)
        assert _remat_count(jaxpr.jaxpr) == count  # one checkpointed call per block
    g_plain = jax.jit(jax.grad(loss(nnx.graphdef(plain))))(state)
    g_remat = jax.jit(jax.grad(loss(nnx.graphdef(remat))))(state)
    leaves = jax.tree.leaves(g_plain)
    assert any(np.any(np.asarray(g)) for g in leaves)
    for a, b in zip(leaves, jax.tree.leaves(g_remat), strict=True):
        np.testing.assert_array_equal(a, b)


def _digits_dit_config(tmp_path) -> ml_collections.ConfigDict:
    config = tiny_digits_config(str(tmp_path))
    config.model = ml_collections.ConfigDict(
        dict(name="dit", patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=10, learn_sigma=False)
    )
    return config


def test_build_model_from_a_digits_config(tmp_path):
    config = _digits_dit_config(tmp_path)
    graphdef, init = build_model(config, (8, 8, 1))
    params = init(jax.random.key(0))
    assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    assert sum(p.size for p in jax.tree.leaves(params)) == _dit_param_count(2, 32, p=2, c_in=1, c_out=1,
                                                                            num_classes=10)
    x = jax.random.normal(jax.random.key(1), (B, 8, 8, 1))
    t, labels = jnp.arange(B) * 20, jnp.arange(B)

    def loss(p):
        out = model_apply(graphdef, p, x, t, labels, train=True, dropout_key=jax.random.key(2))
        return jnp.mean((out - x) ** 2), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    assert out.shape == (B, 8, 8, 1) and not np.any(np.asarray(out))  # adaLN-Zero
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    assert np.any(np.asarray(grads["final_layer"]["linear"]["kernel"]))


def test_build_model_rejects_a_patch_size_that_does_not_divide_the_image(tmp_path):
    config = _digits_dit_config(tmp_path)
    config.model.patch_size = 3
    message = r"model\.patch_size: 3 does not divide data\.image_size=8; use one of 1, 2, 4, 8"
    with pytest.raises(ConfigError, match=message):
        build_model(config, (8, 8, 1))


# Text and context conditioning (PixArt-α, arXiv 2310.00426, §2.3): cross-attention in every block.
CTX = dict(image_size=8, in_channels=3, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=5)
TEXT = dict(vocab_size=11, max_len=6, width=16, depth=1, num_heads=2)  # a text encoder of width 16
CROSS = ("to_q.kernel", "to_k.kernel", "to_v.kernel", "to_out.0.kernel", "to_out.0.bias")


def _rbg() -> nnx.Rngs:
    """rbg keys: eager initialisation compiles far less than with threefry."""
    return nnx.Rngs(jax.random.key(0, impl="rbg"))


def _paths(state: nnx.State) -> dict[str, tuple[int, ...]]:
    return {".".join(map(str, path)): tuple(p.shape) for path, p in nnx.to_flat_state(state)}


def _set(state: nnx.State, name: str, value) -> nnx.State:
    """`state` with every parameter whose path ends in `name` replaced by `value(shape)`."""
    flat = [(path, p.replace(jnp.asarray(value(p.shape), jnp.float32))
             if ".".join(map(str, path)).endswith(name) else p) for path, p in nnx.to_flat_state(state)]
    return nnx.from_flat_state(flat)


def _context_forward(graphdef: nnx.GraphDef):
    return jax.jit(lambda state, x, t, cond: nnx.merge(graphdef, state)(x, t, cond))


@pytest.fixture(scope="module")
def ctx_inputs():
    kx, kc = jax.random.split(jax.random.key(11))
    x = jax.random.normal(kx, (B, 8, 8, 3))
    t = jnp.array([0, 250, 500, 999])
    context = jax.random.normal(kc, (B, 5, 12))
    mask = jnp.arange(5)[None, :] < jnp.array([5, 3, 1, 0])[:, None]  # row 3: every token is padding
    cond = {"label": jnp.array([0, 1, 2, 3]), "context": context, "context_mask": mask, "pooled": jnp.ones((B, 6))}
    return x, t, cond


def test_context_arguments_add_only_their_parameters():
    """context_dim adds `blocks.{i}.cross_attn.*` (models.attention.Attention's names), pooled_dim `cond.pooled.*`,
    text_encoder `text_encoder.*` as well; the plain DiT's tree is unchanged. Variants take the arguments too."""
    plain = _paths(nnx.state(nnx.eval_shape(lambda: DiT(**CTX, rngs=nnx.Rngs(0)))))
    with_ctx = _paths(nnx.state(nnx.eval_shape(lambda: DiT(**CTX, context_dim=12, pooled_dim=6, rngs=nnx.Rngs(0)))))
    added = {f"blocks.{i}.cross_attn.{name}" for i in range(2) for name in CROSS} | {"cond.pooled.kernel",
                                                                                    "cond.pooled.bias"}
    assert set(with_ctx) == set(plain) | added and not set(plain) & added
    assert {k: with_ctx[k] for k in plain} == plain
    assert with_ctx["blocks.0.cross_attn.to_k.kernel"] == (12, 32) and with_ctx["cond.pooled.kernel"] == (6, 32)
    assert with_ctx["blocks.1.cross_attn.to_q.kernel"] == with_ctx["blocks.1.cross_attn.to_out.0.kernel"] == (32, 32)

    text = _paths(nnx.state(nnx.eval_shape(lambda: models.create("dit", rngs=nnx.Rngs(0), **CTX, text_encoder=TEXT))))
    assert text["blocks.0.cross_attn.to_k.kernel"] == (16, 32)  # context_dim = the encoder's width
    assert text["cond.pooled.kernel"] == (16, 32)  # its pooled output joins c
    assert text["text_encoder.token_embed.embedding"] == (11, 16) and text["text_encoder.pos_embed"] == (6, 16)

    s2 = nnx.eval_shape(lambda: models.create("DiT-S/2", rngs=nnx.Rngs(0), image_size=8, in_channels=4,
                                              context_dim=12, pooled_dim=6, text_encoder=None))
    assert s2.blocks[11].cross_attn.to_k.kernel.shape == (12, 384) and s2.cond.pooled.kernel.shape == (6, 384)


def test_cross_attention_starts_at_zero_then_reads_the_context(ctx_inputs):
    """A fresh cross-attention adds exactly nothing (zero to_out, PixArt's init): the model computes the plain DiT
    of the same weights, whatever the context. Once to_out is perturbed the context matters."""
    x, t, cond = ctx_inputs
    model = DiT(**CTX, context_dim=12, pooled_dim=6, rngs=_rbg())
    for block in model.blocks:
        assert not np.any(np.asarray(block.cross_attn.to_out[0].kernel[...]))
        assert not np.any(np.asarray(block.cross_attn.to_out[0].bias[...]))
        k = np.abs(np.asarray(block.cross_attn.to_k.kernel[...]))  # xavier_uniform, as DiT's other linears
        assert 0.9 * math.sqrt(6 / (12 + 32)) < k.max() <= math.sqrt(6 / (12 + 32))
    graphdef, state = nnx.split(model)
    state = _set(_random_state(state, seed=5), "cross_attn.to_out.0.kernel", np.zeros)
    state = _set(state, "cross_attn.to_out.0.bias", np.zeros)
    f = _context_forward(graphdef)
    out = np.asarray(f(state, x, t, cond))
    plain_graphdef = nnx.graphdef(nnx.eval_shape(lambda: DiT(**CTX, pooled_dim=6, rngs=nnx.Rngs(0))))
    plain_state = nnx.from_flat_state([(p, v) for p, v in nnx.to_flat_state(state) if "cross_attn" not in p])
    no_context = {k: cond[k] for k in ("label", "pooled")}
    np.testing.assert_allclose(out, _context_forward(plain_graphdef)(plain_state, x, t, no_context), atol=1e-6)
    np.testing.assert_allclose(out, f(state, x, t, cond | {"context": -cond["context"]}), atol=1e-6)

    rng = np.random.default_rng(6)
    state = _set(state, "cross_attn.to_out.0.kernel", lambda shape: rng.standard_normal(shape) / math.sqrt(shape[0]))
    out = np.asarray(f(state, x, t, cond))
    changed = np.abs(out - np.asarray(f(state, x, t, cond | {"context": -cond["context"]}))).max(axis=(1, 2, 3))
    assert np.all(changed[:3] > 1e-3)  # rows with real tokens read them ...
    assert changed[3] == 0  # ... the all-padding row has none to read


def test_an_all_masked_context_is_no_context_and_padding_changes_nothing(ctx_inputs):
    x, t, cond = ctx_inputs
    graphdef, state = nnx.split(DiT(**CTX, context_dim=12, pooled_dim=6, rngs=_rbg()))
    state = _random_state(state, seed=7)  # every projection perturbed, to_out included
    f = _context_forward(graphdef)
    out = np.asarray(f(state, x, t, cond))
    # The null condition (null label, all-False mask, zero pooled) is no condition at all.
    np.testing.assert_allclose(f(state, x, t, conditioning.null(cond, CTX["num_classes"])), f(state, x, t, None),
                               atol=1e-6)
    # Row 3's context is all padding: it equals the same row given no context.
    np.testing.assert_allclose(out[3], f(state, x, t, {k: cond[k] for k in ("label", "pooled")})[3], atol=1e-6)
    # Padded tokens change nothing: neither their values nor more of them.
    garbage = jnp.where(cond["context_mask"][..., None], cond["context"], 100.0)
    np.testing.assert_allclose(f(state, x, t, cond | {"context": garbage}), out, atol=1e-6)
    longer = cond | {"context": jnp.pad(cond["context"], ((0, 0), (0, 2), (0, 0)), constant_values=3.0),
                     "context_mask": jnp.pad(cond["context_mask"], ((0, 0), (0, 2)))}
    np.testing.assert_allclose(f(state, x, t, longer), out, atol=1e-5)
    assert np.abs(out - f(state, x, t, cond | {"pooled": -cond["pooled"]})).min() > 0  # the pooled embedding counts


def test_entries_a_dit_was_built_without_are_errors():
    graphdef, state = nnx.split(nnx.eval_shape(lambda: DiT(**CTX, rngs=nnx.Rngs(0))))
    x, t = jnp.zeros((B, 8, 8, 3)), jnp.zeros((B,), jnp.int32)

    def call(cond, g=graphdef, s=state):
        return jax.eval_shape(lambda s: nnx.merge(g, s)(x, t, cond), s)

    with pytest.raises(ValueError, match=r"^context: a token context was given to a model built without "
                                         r"model\.context_dim"):
        call({"context": jnp.zeros((B, 5, 12))})
    with pytest.raises(ValueError, match=r"^cond: tokens were given to a model built without model\.text_encoder"):
        call({"tokens": jnp.zeros((B, 5), jnp.int32)})
    with pytest.raises(ValueError, match=r"^cond: a pooled embedding was given to a model built without "
                                         r"model\.pooled_dim"):
        call({"pooled": jnp.zeros((B, 6))})
    graphdef, state = nnx.split(nnx.eval_shape(lambda: DiT(**CTX, context_dim=12, rngs=nnx.Rngs(0))))
    with pytest.raises(ValueError, match=r"^context: width 7 != model\.context_dim 12"):
        call({"context": jnp.zeros((B, 5, 7))}, graphdef, state)
    with pytest.raises(ConfigError, match=r"model\.context_dim: 12 != model\.text_encoder\.width 16"):
        DiT(**CTX, context_dim=12, text_encoder=TEXT, rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match=r"model\.text_encoder: missing \['vocab_size'\]"):
        DiT(**CTX, text_encoder={k: v for k, v in TEXT.items() if k != "vocab_size"}, rngs=nnx.Rngs(0))


def test_remat_and_bfloat16_with_context(ctx_inputs):
    """One checkpointed call per block with the context as argument; the cross-attention's matmuls
    (to_q, to_k, to_v, QK^T, AV, to_out) run in bfloat16 like the rest of the block."""
    x, t, cond = ctx_inputs
    model = nnx.eval_shape(lambda: DiT(**CTX, context_dim=12, pooled_dim=6, remat=True, dtype=jnp.bfloat16,
                                       rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    jaxpr = jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(x, t, cond))(state)
    assert _remat_count(jaxpr.jaxpr) == CTX["depth"]
    dtypes = _dot_dtypes(jaxpr.jaxpr)  # + the pooled projection; the final layer's two stay float32
    assert dtypes.count("bfloat16") == 13 * CTX["depth"] + 3 and dtypes.count("float32") == 2


def test_text_encoder_tokens_condition_the_dit():
    """`text_encoder`: tokens are encoded jointly; the context feeds the cross-attention, the pooled output c."""
    model = models.create("dit", rngs=_rbg(), **CTX, text_encoder=TEXT)
    graphdef, state = nnx.split(model)
    state = _random_state(state, seed=8)
    f = _context_forward(graphdef)
    x, t = jax.random.normal(jax.random.key(2), (B, 8, 8, 3)), jnp.array([1, 10, 100, 900])
    tokens = jnp.array([[1, 2, 3, 4, 5, 6], [7, 8, 9, 0, 0, 0], [3, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    cond = {"tokens": tokens, "token_mask": tokens > 0}
    out = np.asarray(f(state, x, t, cond))
    assert out.shape == (B, 8, 8, 3) and np.all(np.isfinite(out))
    other = cond | {"tokens": jnp.where(cond["token_mask"], (tokens + 4) % 10 + 1, 0)}
    assert np.all(np.abs(out - f(state, x, t, other)).max(axis=(1, 2, 3))[:3] > 1e-3)  # the caption matters
    np.testing.assert_allclose(f(state, x, t, cond | {"tokens": jnp.where(cond["token_mask"], tokens, 7)}), out,
                               atol=1e-6)  # padded token ids change nothing
    np.testing.assert_allclose(f(state, x, t, conditioning.null(cond, CTX["num_classes"])), f(state, x, t, None),
                               atol=1e-6)
    np.testing.assert_allclose(out[3], f(state, x, t, None)[3], atol=1e-6)  # an empty caption is none
    no_cross = _set(state, "cross_attn.to_out.0.kernel", np.zeros)
    no_cross = _set(no_cross, "cross_attn.to_out.0.bias", np.zeros)
    assert np.abs(f(no_cross, x, t, cond) - f(no_cross, x, t, other)).max() > 1e-3  # through c: the pooled output
