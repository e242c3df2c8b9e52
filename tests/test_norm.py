"""models.norm.GroupNorm against flax's nnx.GroupNorm followed by ADM's scale-shift and SiLU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffusion_jax.models.norm import GroupNorm


def flax_reference(x, gamma, beta, scale, shift, groups, eps, silu):
    """nnx.GroupNorm, then the scale-shift and nnx.silu as separate ops."""
    norm = nnx.GroupNorm(x.shape[-1], num_groups=groups, epsilon=eps, rngs=nnx.Rngs(0))
    norm.scale[...], norm.bias[...] = gamma, beta
    y = norm(x)
    if scale is not None:
        y = y * (1 + scale[:, None, None, :]) + shift[:, None, None, :]
    return nnx.silu(y) if silu else y


@pytest.mark.parametrize("film,silu", [(False, False), (True, True)])
def test_matches_nnx_groupnorm_with_scale_shift_and_silu_and_its_gradients(film, silu):
    k = jax.random.split(jax.random.key(0), 6)
    x = 2.0 * jax.random.normal(k[0], (3, 4, 5, 16)) + 0.5  # an offset mean: the single-pass variance's case
    norm = GroupNorm(16, num_groups=4, epsilon=1e-6, rngs=nnx.Rngs(0))
    norm.scale[...] = 1.0 + 0.3 * jax.random.normal(k[1], (16,))
    norm.bias[...] = 0.2 * jax.random.normal(k[2], (16,))
    scale, shift = (0.3 * jax.random.normal(k[3], (3, 16)), 0.3 * jax.random.normal(k[4], (3, 16))) if film else (
        None, None)
    weights = jax.random.normal(k[5], x.shape)

    graphdef, _ = nnx.split(norm)

    def ours(x, params):  # γ and β enter through bias.broadcast_channels: their gradients are matvecs on the CPU
        return jnp.sum(weights * nnx.merge(graphdef, params)(x, scale=scale, shift=shift, silu=silu))

    def reference(x, params):
        return jnp.sum(weights * flax_reference(x, params["scale"][...], params["bias"][...], scale, shift, 4, 1e-6,
                                                silu))

    params = nnx.state(norm, nnx.Param)
    np.testing.assert_allclose(ours(x, params), reference(x, params), rtol=1e-5)
    for got, want in zip(jax.tree.leaves(jax.grad(ours, argnums=(0, 1))(x, params)),
                         jax.tree.leaves(jax.grad(reference, argnums=(0, 1))(x, params)), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_module_keeps_nnx_groupnorm_paths_dtype_and_token_inputs():
    norm = GroupNorm(8, num_groups=4, epsilon=1e-5, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(norm, nnx.Param))} == {"scale", "bias"}
    tokens = jax.random.normal(jax.random.key(1), (2, 6, 8))  # [B, T, C]: normalised as H*W = T
    y = norm(tokens)
    assert y.shape == tokens.shape and y.dtype == jnp.bfloat16
    want = flax_reference(tokens[:, :, None, :], norm.scale[...], norm.bias[...], None, None, 4, 1e-5, False)
    np.testing.assert_allclose(y.astype(jnp.float32), want[:, :, 0], atol=2e-2)
    with pytest.raises(ValueError, match="num_groups"):
        GroupNorm(6, num_groups=4, rngs=nnx.Rngs(0))
