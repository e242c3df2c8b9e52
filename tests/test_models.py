"""Tests for diffusion_jax.models: sizes, call convention, conditioning, dropout, errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffusion_jax import models
from diffusion_jax.errors import ConfigError
from diffusion_jax.models.layers import timestep_embedding

B = 4
NUM_CLASSES = 3


def _build(make, seed: int) -> nnx.Module:
    """`make()` traced with `nnx.eval_shape`, then every parameter drawn from N(0, 0.2^2).

    Random weights keep zero-initialised output layers from hiding the effect of
    labels and dropout; numpy draws avoid compiling an initialiser per shape,
    which costs seconds per model on a small CPU.
    """
    model = nnx.eval_shape(make)
    rng = np.random.default_rng(seed)
    params = jax.tree.map(
        lambda s: jnp.asarray(0.2 * rng.standard_normal(s.shape), s.dtype),
        nnx.state(model, nnx.Param),
    )
    nnx.update(model, params)
    return model


def _forward(model: nnx.Module):
    """Params and a jitted pure call `f(params, x, t, cond, key, train)`, as a train step uses it."""
    graphdef, params = nnx.split(model)

    @jax.jit(static_argnames="train")
    def f(params, x, t, cond, key, train):
        return nnx.merge(graphdef, params)(x, t, cond, train, rngs=nnx.Rngs(dropout=key))

    return params, f


@pytest.fixture(scope="module")
def cond_unet():
    """Tiny class-conditional DDPM-style U-Net with dropout and random weights."""
    model = _build(
        lambda: models.create(
            "unet",
            rngs=nnx.Rngs(0),
            image_size=8,
            in_channels=3,
            ch=8,
            ch_mult=(1, 2),
            num_res_blocks=1,
            attn_resolutions=(4,),
            dropout=0.3,
            num_classes=NUM_CLASSES,
        ),
        seed=1,
    )
    params, f = _forward(model)
    return model, params, f


@pytest.fixture(scope="module")
def inputs():
    kx, kt = jax.random.split(jax.random.key(2))
    x = jax.random.normal(kx, (B, 8, 8, 3))
    t = jax.random.randint(kt, (B,), 0, 1000)
    return x, t


def test_ho_cifar10_param_count():
    n = models.count_params(
        lambda: models.create(
            "unet",
            rngs=nnx.Rngs(0),
            image_size=32,
            in_channels=3,
            ch=128,
            ch_mult=(1, 2, 2, 2),
            num_res_blocks=2,
            attn_resolutions=(16,),
            dropout=0.1,
            num_heads=1,
        )
    )
    assert abs(n - 35.7e6) <= 0.1e6
    assert n == 35_746_307  # Ho et al.'s diffusion_tf CIFAR-10 model


def test_unet_output_shape(cond_unet, inputs):
    _, params, f = cond_unet
    x, t = inputs
    y = f(params, x, t, jnp.zeros((B,), jnp.int32), jax.random.key(0), train=False)
    assert y.shape == x.shape and y.dtype == x.dtype


def test_adm_unet_learn_sigma_shape(inputs):
    model = _build(
        lambda: models.UNet(
            image_size=8,
            in_channels=3,
            ch=16,
            ch_mult=(1, 2),
            num_res_blocks=1,
            attn_resolutions=(8,),
            num_head_channels=8,
            use_scale_shift_norm=True,
            resblock_updown=True,
            learn_sigma=True,
            rngs=nnx.Rngs(0),
        ),
        seed=2,
    )
    graphdef, params = nnx.split(model)
    x, t = inputs
    y = jax.jit(lambda p, x, t: nnx.merge(graphdef, p)(x, t))(params, x, t)  # rngs=None
    assert y.shape == (B, 8, 8, 6)


def test_class_conditioning_and_null_label(cond_unet, inputs):
    _, params, f = cond_unet
    x, t = inputs
    key = jax.random.key(0)

    def run(cond):
        return f(params, x, t, cond, key, train=False)

    y0 = run(jnp.zeros((B,), jnp.int32))
    y1 = run(jnp.ones((B,), jnp.int32))
    y_null = run(jnp.full((B,), NUM_CLASSES, jnp.int32))
    y_none = run(None)
    assert not np.allclose(y0, y1)
    assert not np.allclose(y0, y_null)
    np.testing.assert_array_equal(y_null, y_none)


def test_dropout_uses_call_rngs(cond_unet, inputs):
    _, params, f = cond_unet
    x, t = inputs
    cond = jnp.zeros((B,), jnp.int32)
    k1, k2 = jax.random.key(10), jax.random.key(11)
    a = f(params, x, t, cond, k1, train=True)
    b = f(params, x, t, cond, k2, train=True)
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(a, f(params, x, t, cond, k1, train=True))
    e1 = f(params, x, t, cond, k1, train=False)
    e2 = f(params, x, t, cond, k2, train=False)
    np.testing.assert_array_equal(e1, e2)


def test_state_is_params_only(cond_unet):
    model, _, _ = cond_unet
    _, params, rest = nnx.split(model, nnx.Param, ...)
    assert jax.tree.leaves(rest) == []
    assert len(jax.tree.leaves(params)) > 0


def test_unknown_model_name():
    names = r"DiT-B/2, .*, autoencoder_kl, classifier, controlnet_unet, dit, mlp, unet"
    with pytest.raises(ConfigError, match=rf"model\.name: unknown model 'x'; choose one of: {names}"):
        models.create("x", rngs=nnx.Rngs(0))
    dits = [f"DiT-{size}/{patch}" for size in ("B", "L", "S", "XL") for patch in (2, 4, 8)]
    assert models.names() == [*dits, "autoencoder_kl", "classifier", "controlnet_unet", "dit", "mlp", "unet"]


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(image_size=20, ch_mult=(1, 2, 2, 2)), r"data\.image_size: 20 .*multiple of 8"),
        (dict(image_size=8, ch_mult=(1, 2), attn_resolutions=(16,)), r"model\.attn_resolutions"),
        (dict(image_size=8, ch_mult=(1, 2), attn_resolutions=(), num_heads=3), r"model\.num_heads"),
        (dict(image_size=8, ch_mult=(1, 2), attn_resolutions=(8,), num_head_channels=3), r"model\.num_head_channels"),
    ],
)
def test_unet_config_errors(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        models.create("unet", rngs=nnx.Rngs(0), in_channels=3, ch=8, **kwargs)


def test_labels_on_unconditional_model():
    model = _build(lambda: models.MLP(2, hidden=16, depth=1, rngs=nnx.Rngs(0)), seed=3)
    with pytest.raises(ValueError, match=r"model\.num_classes"):
        model(jnp.zeros((B, 2)), jnp.zeros((B,), jnp.int32), jnp.zeros((B,), jnp.int32))


def test_mlp_shapes():
    x = jnp.ones((B, 2))
    t = jnp.linspace(0.0, 1.0, B)
    model = models.create("mlp", rngs=nnx.Rngs(0), in_features=2, hidden=32, depth=2)
    assert model(x, t).shape == (B, 2)
    model = models.MLP(2, hidden=32, depth=2, num_classes=NUM_CLASSES, learn_sigma=True, rngs=nnx.Rngs(0))
    assert model(x, t, jnp.zeros((B,), jnp.int32)).shape == (B, 4)


@pytest.mark.parametrize("dim", [16, 7])
def test_timestep_embedding_formula(dim):
    t = np.array([0, 1, 17, 999], dtype=np.int32)
    half = dim // 2
    freqs = np.exp(-math.log(10000.0) * np.arange(half) / half)
    args = t[:, None].astype(np.float64) * freqs[None, :]
    want = np.concatenate([np.cos(args), np.sin(args)], axis=1)
    if dim % 2:
        want = np.concatenate([want, np.zeros((len(t), 1))], axis=1)
    got = timestep_embedding(jnp.asarray(t), dim)
    assert got.shape == (len(t), dim) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-4)


def test_unet_remat_recomputes_each_stage_with_the_same_gradients_and_dropout(cond_unet, inputs):
    """`remat=True` checkpoints every stage of the down and up paths and changes no number, dropout
    included: the rematerialised forward draws the same dropout masks."""
    _, params, _ = cond_unet
    x, t = inputs
    cond = jnp.arange(B, dtype=jnp.int32) % NUM_CLASSES
    kwargs = dict(image_size=8, in_channels=3, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                  dropout=0.3, num_classes=NUM_CLASSES)

    def loss(remat: bool):
        graphdef = nnx.graphdef(nnx.eval_shape(lambda: models.create("unet", rngs=nnx.Rngs(0), remat=remat, **kwargs)))
        return lambda p: jnp.mean(
            nnx.merge(graphdef, p)(x, t, cond, True, rngs=nnx.Rngs(dropout=jax.random.key(5))) ** 2
        )

    def checkpoints(jaxpr) -> int:
        return sum(eqn.primitive.name in ("remat2", "checkpoint") for eqn in jaxpr.eqns)

    assert checkpoints(jax.make_jaxpr(loss(False))(params).jaxpr) == 0
    assert checkpoints(jax.make_jaxpr(loss(True))(params).jaxpr) == 6  # 1 stage per level down, 2 per level up
    plain, remat = jax.jit(jax.grad(loss(False)))(params), jax.jit(jax.grad(loss(True)))(params)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
