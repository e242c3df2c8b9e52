"""Per-channel parameters (biases, GroupNorm's scale and shift) broadcast so that their gradients are fast on the CPU.

A vector v [C] added to or multiplying activations [B, H, W, C] gets as its gradient the cotangent summed over
B, H and W. XLA:CPU compiles that sum into a `reduce-window` over the leading axes, which runs at 2-3 GB/s,
while a matrix-vector product 1ᵀ G of the same numbers runs ~5x faster (`benchmarks/loop_fusions.py`); in the
small U-Net's train step these sums took 78 of 439 ms of op time (benchmarks/README.md). `broadcast_channels`
therefore writes the broadcast, on the CPU, as the outer product 1 vᵀ, whose transpose JAX derives as that
matrix-vector product; elsewhere it is a plain broadcast. The values are the same (1 · v = v exactly); the
gradient sums the same numbers in another order (fp32 rounding). Forward and reverse mode both hold.

`Conv` and `Linear` are `nnx.Conv` and `nnx.Linear` with the same parameters (`kernel`, `bias`), shapes, names
and initialisation (the same keys drawn in the same order), whose bias is added by `broadcast_channels`.
"""

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes
from jax.typing import DTypeLike

_ZEROS = nnx.initializers.zeros_init()  # nnx.Conv's and nnx.Linear's default bias initialiser


def broadcast_channels(v: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """v [C] broadcast to `shape` [..., C]: on the CPU as 1 vᵀ (module docstring), elsewhere `broadcast_to`."""
    if jax.default_backend() != "cpu" or len(shape) < 2:
        return jnp.broadcast_to(v, shape)
    ones = jnp.ones((math.prod(shape[:-1]), 1), v.dtype)
    return jax.lax.dot_general(ones, v[None, :], (((1,), (0,)), ((), ()))).reshape(shape)


class Conv(nnx.Conv):
    """`nnx.Conv` (same arguments and parameters) whose bias is added by `broadcast_channels`. The parent is built
    without a bias (its `use_bias` reads False) so that its call leaves the bias to this class; read `bias`."""

    def __init__(self, in_features: int, out_features: int, kernel_size: int | Sequence[int], *, use_bias: bool = True,
                 bias_init: nnx.Initializer = _ZEROS, param_dtype: DTypeLike = jnp.float32,
                 rngs: nnx.Rngs, **kwargs: Any):
        super().__init__(in_features, out_features, kernel_size, use_bias=False, param_dtype=param_dtype,
                         rngs=rngs, **kwargs)
        if use_bias:  # drawn after the kernel's key, as nnx.Conv draws it
            self.bias = nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype))

    def __call__(self, inputs: jax.Array) -> jax.Array:
        y = super().__call__(inputs)  # the convolution alone: the parent was built without its bias
        return y if self.bias is None else y + broadcast_channels(self.bias[...].astype(y.dtype), y.shape)


class Linear(nnx.Linear):
    """`nnx.Linear` (same arguments and parameters) whose bias is added by `broadcast_channels`. Its `use_bias`
    reads False, as `Conv`'s; read `bias`."""

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True,
                 bias_init: nnx.Initializer = _ZEROS, param_dtype: DTypeLike = jnp.float32,
                 rngs: nnx.Rngs, **kwargs: Any):
        super().__init__(in_features, out_features, use_bias=False, param_dtype=param_dtype, rngs=rngs, **kwargs)
        if use_bias:  # drawn after the kernel's key, as nnx.Linear draws it
            self.bias = nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype))

    def __call__(self, inputs: jax.Array) -> jax.Array:
        inputs, kernel = dtypes.promote_dtype((inputs, self.kernel[...]), dtype=self.dtype)
        y = jax.lax.dot_general(inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())), precision=self.precision)
        return y if self.bias is None else y + broadcast_channels(self.bias[...].astype(y.dtype), y.shape)
