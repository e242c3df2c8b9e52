"""models.bias: per-channel broadcasts whose gradients XLA:CPU runs as matrix-vector products, and the Conv and
Linear that add their biases that way, against flax's nnx.Conv and nnx.Linear."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffusion_jax.models.bias import Conv, Linear, broadcast_channels


def test_the_broadcasts_gradient_is_a_matvec_not_a_reduction_of_the_leading_axes():
    v = jnp.arange(8.0)
    cotangent = jax.random.normal(jax.random.key(0), (4, 3, 5, 8))

    def contracted(v):
        return jnp.sum(cotangent * broadcast_channels(v, cotangent.shape))

    np.testing.assert_array_equal(broadcast_channels(v, cotangent.shape), jnp.broadcast_to(v, cotangent.shape))
    np.testing.assert_allclose(jax.grad(contracted)(v), cotangent.sum(axis=(0, 1, 2)), rtol=1e-5)
    jvp = jax.jvp(contracted, (v,), (jnp.ones(8),))[1]  # forward mode too
    np.testing.assert_allclose(jvp, cotangent.sum(), rtol=1e-5)
    gradient = jax.grad(lambda v, cotangent: jnp.sum(cotangent * broadcast_channels(v, cotangent.shape)))
    program = jax.jit(gradient).lower(v, cotangent).compile().as_text()
    assert " dot(" in program and "reduce-window" not in program and " reduce(" not in program


@pytest.mark.parametrize("layer", ["conv", "conv_strided_no_bias", "linear"])
def test_conv_and_linear_are_flaxs_in_parameters_outputs_and_gradients(layer):
    bias_init = nnx.initializers.normal(1.0)  # a bias that shows: nnx's default is zeros
    if layer == "linear":
        make = lambda cls: cls(6, 5, bias_init=bias_init, rngs=nnx.Rngs(3))  # noqa: E731
        x = jax.random.normal(jax.random.key(1), (2, 7, 6))
    else:
        kwargs = dict(strides=2, use_bias=False) if layer == "conv_strided_no_bias" else {}
        make = lambda cls: cls(6, 5, (3, 3), bias_init=bias_init, rngs=nnx.Rngs(3), **kwargs)  # noqa: E731
        x = jax.random.normal(jax.random.key(1), (2, 8, 8, 6))
    ours, flax_layer = make(Conv if layer != "linear" else Linear), make(nnx.Conv if layer != "linear" else nnx.Linear)
    ours_params, flax_params = nnx.state(ours, nnx.Param), nnx.state(flax_layer, nnx.Param)
    assert jax.tree.map(np.shape, ours_params) == jax.tree.map(np.shape, flax_params)  # same names and shapes
    jax.tree.map(np.testing.assert_array_equal, ours_params, flax_params)  # same keys drawn, in the same order
    weights = jax.random.normal(jax.random.key(2), flax_layer(x).shape)

    def loss(module, x):
        return jnp.sum(weights * module(x))

    np.testing.assert_allclose(ours(x), flax_layer(x), rtol=1e-6, atol=1e-6)
    got, want = nnx.grad(loss, argnums=(0, 1))(ours, x), nnx.grad(loss, argnums=(0, 1))(flax_layer, x)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), got, want)
