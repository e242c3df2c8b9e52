"""Declarative weight mappings: which source tensors make each of our parameters, and how.

A `Rule` matches our parameter paths ('down/0/stages/1/res/conv1/kernel': the nnx state path, '/'-joined)
with a regex and names the source tensor(s) with a template of its groups ('down_blocks.{0}.resnets.{1}.conv1.weight');
group values can be shifted ('{0+1}') where the two sides count differently. Its `layout` turns the PyTorch
tensor into ours:

- 'linear'  (out, in) -> (in, out)
- 'conv'    (O, I, kh, kw) -> (kh, kw, I, O)
- 'conv1x1' (O, I, 1, 1) -> (I, O): a 1x1 convolution that is a Dense layer here
- 'copy'    as is (biases, norm scales, embeddings)
- 'linear_swap_input_halves'  'linear', then the two halves of the input rows swapped: a layer reading a
            [sin, cos] timestep embedding made to read our [cos, sin] one

A rule with several sources concatenates them on the last axis after the layout (PyTorch's separate q, k, v
into our fused qkv). `convert` applies a rule list to every parameter of a model and is strict: a parameter
no rule matches, a source tensor that is missing, and (unless `ignore` matches it) a source tensor no rule
used are all reported by name, and a shape mismatch is one line naming both paths and both shapes.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence

import jax
import numpy as np
from flax import nnx

from diffusion_jax.convert.source import TensorSource
from diffusion_jax.errors import ConfigError

LAYOUTS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "linear": lambda w: w.T,
    "conv": lambda w: w.transpose(2, 3, 1, 0),
    "conv1x1": lambda w: w[:, :, 0, 0].T,
    "copy": lambda w: w,
    "linear_swap_input_halves": lambda w: np.roll(w.T, w.shape[1] // 2, axis=0),
}


@dataclasses.dataclass(frozen=True)
class Rule:
    """Our parameters matching `target` (a full-path regex) come from `sources` (templates of its groups)."""

    target: str
    sources: str | tuple[str, ...]
    layout: str = "copy"

    def source_names(self, match: re.Match) -> tuple[str, ...]:
        templates = (self.sources,) if isinstance(self.sources, str) else self.sources
        return tuple(_fill(t, match.groups()) for t in templates)


def _fill(template: str, groups: Sequence[str]) -> str:
    """'a.{0}.b.{1-1}' with groups ('3', '2') -> 'a.3.b.1'; a group's '/' (our path separator) becomes '.'
    (PyTorch's): '{0}.conv.weight' with 'Mixed_5b/branch1x1' -> 'Mixed_5b.branch1x1.conv.weight'."""

    def field(m: re.Match) -> str:
        index, shift = int(m.group(1)), int(m.group(2) or 0)
        return str(int(groups[index]) + shift) if shift else groups[index].replace("/", ".")

    return re.sub(r"\{(\d+)([+-]\d+)?\}", field, template)


def path_name(path: tuple) -> str:
    """'down/0/stages/1/res/conv1/kernel' of a pytree key path into a parameter state."""
    keys = [getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path]
    return "/".join(str(k) for k in keys if k != "value")


def param_paths(params: nnx.State) -> dict[str, jax.ShapeDtypeStruct]:
    """{'down/0/stages/1/res/conv1/kernel': leaf} of a (possibly abstract) parameter state."""
    return {path_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


@dataclasses.dataclass
class Report:
    """What a conversion used: source tensors per parameter, and the source tensors it left alone."""

    used: dict[str, tuple[str, ...]]
    ignored: list[str]

    def summary(self) -> str:
        return (f"{len(self.used)} parameters from {sum(len(v) for v in self.used.values())} tensors; "
                f"{len(self.ignored)} source tensors ignored by rule")


LAYOUT_SHAPES: dict[str, Callable[[tuple[int, ...]], tuple[int, ...]]] = {  # each layout's result shape
    "linear": lambda s: s[::-1],
    "conv": lambda s: (s[2], s[3], s[1], s[0]),
    "conv1x1": lambda s: (s[1], s[0]),
    "copy": lambda s: s,
    "linear_swap_input_halves": lambda s: s[::-1],
}


def plan(
    rules: Sequence[Rule], target: nnx.State, source: TensorSource, ignore: Sequence[str] = (),
    field: str = "model.pretrained",
) -> tuple[dict[str, tuple[Rule, tuple[str, ...]]], list[str]]:
    """({our path: (rule, source names)}, source names ignored), checked from names and shapes alone (nothing
    is read): a ConfigError for unmatched parameters, missing or unused source tensors (`ignore`: regexes of
    source names that may stay unused, e.g. buffers) and shape mismatches, each naming `field`."""
    paths = param_paths(target)
    planned: dict[str, tuple[Rule, tuple[str, ...]]] = {}
    unmatched = []
    for path in paths:
        for rule in rules:
            match = re.fullmatch(rule.target, path)
            if match:
                planned[path] = (rule, rule.source_names(match))
                break
        else:
            unmatched.append(path)
    if unmatched:
        raise ConfigError(f"{field}: no conversion rule for {len(unmatched)} of our parameters: "
                          f"{_listing(unmatched)}")
    wanted = {name for _, names in planned.values() for name in names}
    missing = sorted(wanted - set(source.names))
    if missing:
        raise ConfigError(f"{field}: {source.describe} lacks {len(missing)} tensors the model needs: "
                          f"{_listing(missing)}")
    unused = [n for n in source.names if n not in wanted]
    ignored = [n for n in unused if any(re.fullmatch(p, n) for p in ignore)]
    left = [n for n in unused if n not in ignored]
    if left:
        raise ConfigError(f"{field}: {len(left)} tensors of {source.describe} are used by no rule (a model "
                          f"configured differently?): {_listing(left)}")
    for path, (rule, names) in planned.items():
        shapes = [LAYOUT_SHAPES[rule.layout](tuple(source.shape(n))) for n in names]
        shape = shapes[0] if len(shapes) == 1 else (*shapes[0][:-1], sum(s[-1] for s in shapes))
        if tuple(shape) != tuple(paths[path].shape):
            given = ", ".join(f"{n} {tuple(source.shape(n))}" for n in names)
            raise ConfigError(f"{field}: {path} has shape {tuple(paths[path].shape)} here, but {given} "
                              f"makes {tuple(shape)} ({rule.layout})")
    return planned, ignored


def _listing(names: Sequence[str], shown: int = 8) -> str:
    return ", ".join(names[:shown]) + (" ..." if len(names) > shown else "")


def convert(
    rules: Sequence[Rule], target: nnx.State, source: TensorSource, ignore: Sequence[str] = (),
    put: Callable[[str, np.ndarray, jax.ShapeDtypeStruct], jax.Array] | None = None, field: str = "model.pretrained",
) -> tuple[nnx.State, Report]:
    """`target`'s structure (abstract leaves are fine) filled from `source` by `rules`: (params, report).

    Everything `plan` checks is checked before any tensor is read. Then each parameter is read, converted and
    handed to `put(path, array, leaf)` (default: a jax array of the leaf's dtype on the default device) before
    the next is read, so the host holds the parameters made so far and one source tensor.
    """
    put = put or (lambda path, array, leaf: jax.numpy.asarray(array, leaf.dtype))
    planned, ignored = plan(rules, target, source, ignore, field)
    values = {}
    for path, leaf in param_paths(target).items():
        rule, names = planned[path]
        parts = [LAYOUTS[rule.layout](source.get(name)) for name in names]
        values[path] = put(path, parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1), leaf)
        del parts
    treedef = jax.tree_util.tree_structure(target)
    params = jax.tree_util.tree_unflatten(treedef, [values[path] for path in param_paths(target)])
    return params, Report({p: names for p, (_, names) in planned.items()}, ignored)
