"""The fused GroupNorm(+scale-shift, +SiLU) against the plain formulation: outputs and every gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffusion_jax.models.norm import GroupNorm, group_norm_act


def plain(x, gamma, beta, scale, shift, groups, eps, silu):
    """flax's nnx.GroupNorm, then ADM's scale-shift and nnx.silu, differentiated by JAX."""
    norm = nnx.GroupNorm(x.shape[-1], num_groups=groups, epsilon=eps, rngs=nnx.Rngs(0))
    norm.scale[...], norm.bias[...] = gamma, beta
    y = norm(x)
    if scale is not None:
        y = y * (1 + scale[:, None, None, :]) + shift[:, None, None, :]
    return nnx.silu(y) if silu else y


@pytest.mark.parametrize("film", [False, True])
@pytest.mark.parametrize("silu", [False, True])
def test_matches_plain_formulation_and_its_gradients(film, silu):
    k = jax.random.split(jax.random.key(0), 6)
    x = 2.0 * jax.random.normal(k[0], (3, 4, 5, 16)) + 0.5  # an offset mean: the single-pass variance's case
    gamma = 1.0 + 0.3 * jax.random.normal(k[1], (16,))
    beta = 0.2 * jax.random.normal(k[2], (16,))
    scale, shift = 0.3 * jax.random.normal(k[3], (3, 16)), 0.3 * jax.random.normal(k[4], (3, 16))
    weights = jax.random.normal(k[5], x.shape)  # a loss that weighs every output differently

    def loss(fn):
        return lambda x, g, b, s, t: jnp.sum(weights * fn(x, g, b, s if film else None, t if film else None))

    fused = loss(lambda x, g, b, s, t: group_norm_act(x, g, b, groups=4, eps=1e-6, scale=s, shift=t, silu=silu))
    reference = loss(lambda x, g, b, s, t: plain(x, g, b, s, t, 4, 1e-6, silu))
    args = (x, gamma, beta, scale, shift)
    np.testing.assert_allclose(fused(*args), reference(*args), rtol=1e-5)
    argnums = (0, 1, 2, 3, 4) if film else (0, 1, 2)
    for got, want in zip(jax.grad(fused, argnums)(*args), jax.grad(reference, argnums)(*args), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(jnp.abs(want).max()))


def test_forward_mode_matches_plain_formulation():
    """The derivative is a custom JVP, so forward mode (the ODE likelihood's divergence, the conditional
    inpainting denoiser, JVP objectives) works and agrees with JAX's derivative of the plain formulation."""
    k = jax.random.split(jax.random.key(1), 10)
    primals = (jax.random.normal(k[0], (2, 3, 4, 8)) + 0.3, 1.0 + 0.2 * jax.random.normal(k[1], (8,)),
               0.1 * jax.random.normal(k[2], (8,)), 0.2 * jax.random.normal(k[3], (2, 8)),
               0.2 * jax.random.normal(k[4], (2, 8)))
    tangents = tuple(jax.random.normal(key, p.shape) for key, p in zip(k[5:], primals, strict=True))
    _, got = jax.jvp(lambda *a: group_norm_act(*a[:3], groups=2, eps=1e-6, scale=a[3], shift=a[4], silu=True),
                     primals, tangents)
    _, want = jax.jvp(lambda *a: plain(*a, 2, 1e-6, True), primals, tangents)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_module_keeps_nnx_groupnorm_paths_dtype_and_token_inputs():
    norm = GroupNorm(8, num_groups=4, epsilon=1e-5, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(norm, nnx.Param))} == {"scale", "bias"}
    tokens = jax.random.normal(jax.random.key(1), (2, 6, 8))  # [B, T, C]: normalised as H*W = T
    y = norm(tokens)
    assert y.shape == tokens.shape and y.dtype == jnp.bfloat16
    want = plain(tokens[:, :, None, :], norm.scale[...], norm.bias[...], None, None, 4, 1e-5, False)[:, :, 0]
    np.testing.assert_allclose(y.astype(jnp.float32), want, atol=2e-2)
    with pytest.raises(ValueError, match="num_groups"):
        GroupNorm(6, num_groups=4, rngs=nnx.Rngs(0))
