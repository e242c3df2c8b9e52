"""The device mesh and the shardings of the train state and the batches."""

from collections.abc import Sequence

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec


def make_data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over `devices` (default: every device of every process), axis 'data'.

    Auto axis types: shardings are propagated by XLA (`jax.make_mesh` now defaults
    to Explicit, shared/notes/stack-2026-11.md surprise 1).
    """
    devices = jax.devices() if devices is None else list(devices)
    return jax.make_mesh((len(devices),), ("data",), axis_types=(AxisType.Auto,), devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over 'data'; the rest replicated."""
    return NamedSharding(mesh, PartitionSpec("data"))

