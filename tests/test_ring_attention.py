"""Sequence-parallel ring attention on 8 simulated devices against single-device attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from diffusion_jax.errors import ConfigError
from diffusion_jax.models.ring_attention import sequence_parallel_attention


def reference(q, k, v, key_mask):
    """jax.nn.dot_product_attention with the key mask; a query with no real key gives zeros."""
    out = jax.nn.dot_product_attention(q, k, v, mask=key_mask[:, None, None, :])
    return jnp.where(key_mask.any(axis=1)[:, None, None, None], out, 0.0)


@pytest.mark.parametrize("shape,tokens", [((8,), 32), ((2, 4), 30)], ids=["seq8-even", "data2xseq4-padded"])
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "key-padding"])
def test_ring_attention_equals_attention_in_value_and_gradient(shape, tokens, masked):
    names = ("sequence",) if len(shape) == 1 else ("data", "sequence")
    mesh = jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape))
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v = (jax.random.normal(key, (4, tokens, 2, 8)) for key in keys[:3])
    key_mask = (jnp.arange(tokens)[None, :] < jnp.array([tokens, tokens - 5, 3, tokens])[:, None]) if masked \
        else jnp.ones((4, tokens), bool)
    batch_axes = ("data",) if "data" in names else ()

    def ring_loss(q, k, v):
        out = sequence_parallel_attention(q, k, v, mesh, batch_axes=batch_axes, key_mask=key_mask)
        return jnp.sum(jnp.sin(out)), out

    def reference_loss(q, k, v):
        out = reference(q, k, v, key_mask)
        return jnp.sum(jnp.sin(out)), out

    (_, out), grads = jax.jit(jax.value_and_grad(ring_loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    (_, expected), expected_grads = jax.value_and_grad(reference_loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    np.testing.assert_allclose(out, expected, atol=2e-5)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        assert bool(jnp.all(jnp.isfinite(grad)))
        np.testing.assert_allclose(grad, expected_grad, atol=5e-5)


def test_a_mesh_without_the_axis_is_a_one_line_error():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    x = jnp.zeros((8, 16, 2, 4))
    with pytest.raises(ConfigError, match=r"^mesh.sequence: sequence-parallel attention splits the tokens over"):
        sequence_parallel_attention(x, x, x, mesh)
