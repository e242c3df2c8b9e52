"""The device mesh, and the shardings of the train state and the batches, from `config.mesh`.

The mesh always has the axes ('data', 'fsdp', 'sequence', 'tensor'), sized by
`config.mesh.{data,fsdp,sequence,tensor}` (-1: the devices left over; an axis of size 1 costs
nothing). Batches are split over ('data', 'fsdp') and replicated over 'sequence' and 'tensor'; a DiT's
tokens (and the self-attention of a transformer block) are split over 'sequence' when it is larger than
1 (`models.ring_attention`: ring attention, under the mesh that `with_mesh` makes the context).

Parameters are placed by rules, as big_vision does: `config.mesh.param_rules` is a sequence of
(regex, placement) pairs; the first regex that `re.fullmatch`es a parameter's path
('down/0/res/0/conv1/kernel') decides, and a parameter no rule matches is replicated. A placement is

- 'replicate': a full copy on every device;
- 'fsdp': ZeRO-3 / fully sharded data parallelism: the largest dimension divisible by the
  'fsdp' axis is split over it (parameters smaller than `mesh.fsdp_min_size` elements, or with
  no divisible dimension, stay replicated);
- a PartitionSpec written as a tuple, one entry per dimension: an axis name, a tuple of axis
  names, or None, e.g. (None, 'tensor') for a column-parallel kernel.

The EMA copies and the optimiser's moment trees are placed like the parameters they follow
(`optax.tree_map_params`); scalars are replicated. With these shardings given to `jax.jit`, XLA
inserts the all-gathers and reduce-scatters (the train step stays one function for every mesh).
"""

import functools
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from diffusion_jax.errors import ConfigError

AXES = ("data", "fsdp", "sequence", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch is split over these; 'sequence' and 'tensor' hold copies
SEQUENCE_AXIS = "sequence"  # a transformer's tokens are split over this one
PLACEMENTS = ("replicate", "fsdp")


def path_name(path: tuple) -> str:
    """'conv_in/kernel/value' for a key path of dicts, dataclass fields and sequences."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def mesh_shape(mesh_config: Any, num_devices: int) -> dict[str, int]:
    """{'data': d, 'fsdp': f, 'sequence': s, 'tensor': t} with d·f·s·t = `num_devices`, the one -1 resolved.

    Raises a ConfigError naming `mesh.<axis>` for a size that is not a positive int or -1, for
    more than one -1, and for sizes whose product is not the device count.
    """
    sizes = {}
    for axis in AXES:
        size = mesh_config.get(axis, -1 if axis == "data" else 1)
        if isinstance(size, bool) or not isinstance(size, int) or (size < 1 and size != -1):
            raise ConfigError(f"mesh.{axis}: got {size!r}; expected a positive int, or -1 for the devices left over")
        sizes[axis] = size
    free = [axis for axis, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ConfigError(f"mesh: {' and '.join('mesh.' + a for a in free)} are both -1; at most one axis may be -1")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if num_devices % fixed:
            raise ConfigError(
                f"mesh: the fixed axes ({_shape_str(sizes)}) need a multiple of {fixed} devices; "
                f"there are {num_devices}"
            )
        sizes[free[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ConfigError(f"mesh: {_shape_str(sizes)} is {fixed} devices; there are {num_devices} (set one axis to -1)")
    return sizes


def _shape_str(sizes: dict[str, int]) -> str:
    return ", ".join(f"{axis}={size}" for axis, size in sizes.items())


def make_mesh(mesh_config: Any = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The ('data', 'fsdp', 'sequence', 'tensor') mesh of `mesh_config` over `devices` (default: every device
    of every process; None config: all of them on 'data').

    `jax.make_mesh` orders the devices for the physical topology (ICI rings on TPU). Axis types
    are Auto, so shardings propagate through XLA (`jax.make_mesh` now defaults to Explicit,
    shared/notes/stack-2026-11.md surprise 1).
    """
    devices = jax.devices() if devices is None else list(devices)
    sizes = mesh_shape(mesh_config or {}, len(devices))
    shape = tuple(sizes[axis] for axis in AXES)
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def with_mesh(fn: Callable, mesh: Mesh) -> Callable:
    """`fn` traced with `mesh` as the context mesh (`jax.sharding.use_abstract_mesh`), which is how a model finds
    the mesh its sequence-parallel attention splits tokens over (`models.ring_attention.self_attention`); `fn`
    itself when the mesh does not split tokens (`sequence` = 1), so every other run traces as before."""
    if mesh.shape.get(SEQUENCE_AXIS, 1) == 1:
        return fn

    @functools.wraps(fn)
    def traced_under_mesh(*args: Any, **kwargs: Any) -> Any:
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    return traced_under_mesh


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ('data', 'fsdp'); the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def batch_shards(mesh: Mesh) -> int:
    """How many ways a batch is split: the size of ('data', 'fsdp')."""
    return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def check_rules(rules: Any) -> None:
    """Validates `mesh.param_rules`; a ConfigError names the bad rule and what is allowed."""
    if not isinstance(rules, (list, tuple)):
        raise ConfigError(f"mesh.param_rules: got {rules!r}; expected a sequence of (regex, placement) pairs")
    for i, rule in enumerate(rules):
        field = f"mesh.param_rules[{i}]"
        if not (isinstance(rule, (list, tuple)) and len(rule) == 2 and isinstance(rule[0], str)):
            raise ConfigError(f"{field}: got {rule!r}; expected a (regex, placement) pair")
        try:
            re.compile(rule[0])
        except re.error as e:
            raise ConfigError(f"{field}: {rule[0]!r} is not a regular expression ({e})") from None
        placement = rule[1]
        if isinstance(placement, str):
            if placement not in PLACEMENTS:
                raise ConfigError(
                    f"{field}: placement {placement!r}; expected 'replicate', 'fsdp' or a PartitionSpec tuple "
                    f"of axis names from {AXES} and None"
                )
            continue
        if not isinstance(placement, (list, tuple)):
            raise ConfigError(f"{field}: placement {placement!r}; expected 'replicate', 'fsdp' or a tuple")
        for entry in placement:
            if any(name is not None and name not in AXES for name in _axis_names(entry)):
                raise ConfigError(f"{field}: placement {placement!r} names an axis not in {AXES}")


def _axis_names(entry: Any) -> tuple:
    """One PartitionSpec entry as a tuple of axis names: 'fsdp' -> ('fsdp',), None -> (None,)."""
    return tuple(entry) if isinstance(entry, (list, tuple)) else (entry,)


def _fsdp_spec(shape: tuple[int, ...], fsdp: int, min_size: int) -> PartitionSpec:
    """Splits the largest dimension divisible by `fsdp` over 'fsdp' (ties: the last such dim)."""
    if fsdp == 1 or math.prod(shape) < min_size:
        return PartitionSpec()
    candidates = [(size, dim) for dim, size in enumerate(shape) if size % fsdp == 0]
    if not candidates:
        return PartitionSpec()
    _, dim = max(candidates)
    return PartitionSpec(*(("fsdp" if d == dim else None) for d in range(len(shape))))


def _explicit_spec(name: str, shape: tuple[int, ...], placement: Sequence, mesh: Mesh) -> PartitionSpec:
    if len(placement) > len(shape):
        raise ConfigError(
            f"mesh.param_rules: placement {tuple(placement)} has {len(placement)} entries; parameter {name} has "
            f"shape {shape}"
        )
    for dim, entry in enumerate(placement):
        ways = math.prod(mesh.shape[n] for n in _axis_names(entry) if n is not None)
        if shape[dim] % ways:
            raise ConfigError(
                f"mesh.param_rules: placement {tuple(placement)} splits dimension {dim} of {name} (shape {shape}) "
                f"{ways} ways, which does not divide {shape[dim]}"
            )
    return PartitionSpec(*placement)


def param_specs(params: Any, mesh: Mesh, rules: Sequence, fsdp_min_size: int = 0) -> Any:
    """A PartitionSpec for each array of `params` (a tree of arrays or ShapeDtypeStructs)."""
    check_rules(rules)
    compiled = [(re.compile(regex), placement) for regex, placement in rules]

    def spec(path: tuple, leaf: Any) -> PartitionSpec:
        name = path_name(path).removesuffix("/value")
        shape = tuple(leaf.shape)
        for regex, placement in compiled:
            if regex.fullmatch(name):
                if placement == "replicate":
                    return PartitionSpec()
                if placement == "fsdp":
                    return _fsdp_spec(shape, mesh.shape["fsdp"], fsdp_min_size)
                return _explicit_spec(name, shape, placement, mesh)
        return PartitionSpec()

    return jax.tree_util.tree_map_with_path(spec, params)


def state_shardings(
    state: Any, tx: optax.GradientTransformation, mesh: Mesh, mesh_config: Any
) -> Any:
    """NamedShardings for every leaf of a TrainState (arrays or ShapeDtypeStructs).

    params, each EMA and a distillation teacher follow `mesh.param_rules`; the optimiser's
    parameter-shaped trees (Adam's moments) follow the parameters; every other leaf (step, key,
    counters, the timestep history) is replicated.
    """
    mesh_config = mesh_config or {}
    rules = mesh_config.get("param_rules", ((".*", "fsdp"),))
    min_size = mesh_config.get("fsdp_min_size", 0)
    to_named = lambda spec: NamedSharding(mesh, spec)  # noqa: E731
    params = jax.tree.map(to_named, param_specs(state.params, mesh, rules, min_size))
    everything = jax.tree.map(lambda _: replicated(mesh), state)
    opt_state = optax.tree_map_params(
        tx, lambda _, sharding: sharding, state.opt_state, params,
        transform_non_params=lambda _: replicated(mesh),
    )
    teacher = None if state.teacher is None else jax.tree.map(to_named, param_specs(state.teacher, mesh, rules,
                                                                                    min_size))
    return everything.replace(params=params, ema_params=tuple(params for _ in state.ema_params), opt_state=opt_state,
                              teacher=teacher)


def describe(shardings: Any, state: Any) -> str:
    """'3 of 40 parameter arrays sharded; 0.52M of 1.62M parameters per device': one log line."""
    pairs = list(zip(jax.tree.leaves(shardings.params), jax.tree.leaves(state.params), strict=True))
    sharded = sum(any(e is not None for e in s.spec) for s, _ in pairs)
    total = sum(math.prod(x.shape) for _, x in pairs)
    per_device = sum(math.prod(s.shard_shape(x.shape)) for s, x in pairs)
    return (f"{sharded} of {len(pairs)} parameter arrays sharded; "
            f"{per_device / 1e6:.2f}M of {total / 1e6:.2f}M parameters per device")
