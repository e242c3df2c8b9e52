"""The device mesh and the shardings of the train state and the batches."""

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec


def make_data_mesh() -> Mesh:
    """A 1-D mesh over every device of every process, axis 'data'.

    Auto axis types: shardings are propagated by XLA (`jax.make_mesh` now defaults
    to Explicit, shared/notes/stack-2026-11.md surprise 1).
    """
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over 'data'; the rest replicated."""
    return NamedSharding(mesh, PartitionSpec("data"))

