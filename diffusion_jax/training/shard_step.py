"""The explicit-collective train step (`training.step_impl='shard_map'`): each device's loss and gradient of
its own rows of the batch under `jax.shard_map`, all-reduced by hand.

The default train step is one `jax.jit` over the sharded batch: XLA inserts the gradient all-reduce. This one
writes it: inside `jax.shard_map` over the batch axes ('data', 'fsdp') every device differentiates the loss of
its rows with respect to its own (varying) copy of the parameters, then the gradients are averaged with
`jax.lax.pmean` — after `grad`, on per-device gradients. (The other order, `pmean(grad(loss))` with the
parameters left replicated, is shard_map's silent trap: the gradient of a replicated input is already summed
over the devices, so it comes out n times too large; shared/notes/stack-2026-11.md.) The loss and the scalar
metrics are averaged too, and per-example metrics gathered, so the step returns what the jit step returns.
Between the gradient and the all-reduce is where per-device logic goes (local batch statistics, a per-device
clip); the optimiser update stays outside, under jit, so FSDP-sharded parameters update as before.

Randomness (`training.shard_map_rng`):

- 'global' (default): each device draws exactly its rows of the jit step's draws, so the two steps train
  the same run. The loss's key is a `rows` key (`rows_key`, a `jax.extend.random` PRNG implementation):
  split and fold_in act as threefry's, and a draw of shape [b, ...] returns rows shard·b .. (shard+1)·b − 1 of
  threefry's draw of shape [n·b, ...] (a draw of shape () is the same on every device). Threefry's bits
  are a function of the flat index, so these are the jit step's numbers, for every draw whose leading
  axis is the batch — each device generates the whole batch's draw and keeps its rows (random bits
  are cheap next to the network).
- 'per_device': independent streams, the step's key folded with the device's index: the devices' draws
  differ from the jit step's, and from each other's, as per-device randomness should.
"""

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.extend as jex
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from diffusion_jax.training.mesh import BATCH_AXES

RNG_MODES = ("global", "per_device")
LossAndGrads = Callable[..., tuple[tuple[jax.Array, dict[str, jax.Array]], Any]]


def _threefry(data: jax.Array) -> jax.Array:
    return jax.random.wrap_key_data(data[:2], impl="threefry2x32")


@functools.cache
def rows_impl(num_shards: int) -> Any:
    """The PRNG implementation whose keys are (threefry key, shard) and whose draws are that shard's rows of a
    `num_shards` times taller threefry draw."""

    def seed(_: jax.Array) -> jax.Array:
        raise TypeError("a rows key is made from a threefry key by rows_key(key, shard, num_shards)")

    def split(data: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        keys = jax.random.key_data(jax.random.split(_threefry(data), shape))  # [*shape, 2]
        return jnp.concatenate([keys, jnp.broadcast_to(data[2:], (*shape, 1))], axis=-1)

    def fold_in(data: jax.Array, message: jax.Array) -> jax.Array:
        return jnp.concatenate([jax.random.key_data(jax.random.fold_in(_threefry(data), message)), data[2:]])

    def random_bits(data: jax.Array, bit_width: int, shape: tuple[int, ...]) -> jax.Array:
        dtype = jnp.dtype(f"uint{bit_width}")
        if not shape:  # a scalar draw: the same on every device
            return jax.random.bits(_threefry(data), shape, dtype)
        rows = jax.random.bits(_threefry(data), (num_shards * shape[0], *shape[1:]), dtype)
        return jax.lax.dynamic_slice_in_dim(rows, data[2].astype(jnp.int32) * shape[0], shape[0], axis=0)

    return jex.random.define_prng_impl(key_shape=(3,), seed=seed, split=split, random_bits=random_bits,
                                       fold_in=fold_in, name=f"rows_of_{num_shards}", tag=f"rows{num_shards}")


def rows_key(key: jax.Array, shard: jax.Array, num_shards: int) -> jax.Array:
    """A threefry `key` as shard `shard`'s rows key: its draws are that shard's rows of `key`'s draws."""
    data = jnp.concatenate([jax.random.key_data(key), jnp.asarray(shard, jnp.uint32)[None]])
    return jax.random.wrap_key_data(data, impl=rows_impl(num_shards))


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes the batch is split over (those of `mesh_lib.BATCH_AXES` it has)."""
    return tuple(axis for axis in BATCH_AXES if axis in mesh.axis_names)


def all_reduced(loss_and_grads: LossAndGrads, mesh: Mesh, rng: str = "global") -> LossAndGrads:
    """`loss_and_grads(params, state, frozen, images, labels, cond, noise, key) -> ((loss, aux), grads)` of the
    whole batch, computed per device under `jax.shard_map` and all-reduced (see the module docstring).

    `images`, `labels`, `cond` and `noise` arrive split over the batch axes; `params`, `state`, `frozen` (the
    objective's frozen arrays) and `key` replicated. Only the batch axes are manual: a 'sequence' or 'tensor'
    axis stays XLA's, so ring attention still splits the tokens inside.
    """
    axes = batch_axes(mesh)
    num_shards = mesh.shape[axes[0]] * (mesh.shape[axes[1]] if len(axes) > 1 else 1)
    batch = P(axes)

    def per_device(params: Any, state: Any, frozen: Any, images: jax.Array, labels: jax.Array, cond: Any,
                   noise: Any, key: jax.Array) -> tuple:
        shard = jax.lax.axis_index(axes)
        key = rows_key(key, shard, num_shards) if rng == "global" else jax.random.fold_in(key, shard)
        params = jax.lax.pcast(params, axes, to="varying")  # each device's gradient is its own
        (loss, aux), grads = loss_and_grads(params, state, frozen, images, labels, cond, noise, key)
        grads = jax.lax.pmean(grads, axes)  # after grad: the mean of the per-device gradients
        loss = jax.lax.pmean(loss, axes)
        aux = {name: jax.lax.pmean(value, axes) if value.ndim == 0 else gathered(value, shard)
               for name, value in aux.items()}
        return (loss, aux), grads

    def gathered(rows: jax.Array, shard: jax.Array) -> jax.Array:
        """Every device's rows [b, ...] -> the batch's [n b, ...], replicated: a psum of each device's rows placed
        in zeros (what the type system knows to be replicated, unlike `all_gather`'s result)."""
        placed = jax.lax.dynamic_update_slice_in_dim(jnp.zeros((num_shards * rows.shape[0], *rows.shape[1:]),
                                                               rows.dtype), rows, shard * rows.shape[0], axis=0)
        return jax.lax.psum(placed, axes)

    return jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P(), batch, batch, batch, batch, P()),
                         out_specs=P(), axis_names=frozenset(axes))
