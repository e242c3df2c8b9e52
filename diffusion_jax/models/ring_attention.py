"""Sequence-parallel attention: the tokens of one sequence split over a mesh axis, the keys and values passed
round the ring (Ring Attention, Liu et al. 2023, arXiv 2310.01889).

Device i holds the query, key and value blocks [B, T/n, N, d] of its own tokens. In n steps it attends its
queries to the key/value block it holds, then passes that block to device i + 1 (`jax.lax.ppermute`) and
receives device i - 1's, so every query meets every key once while no device holds more than two blocks. The
softmax is accumulated blockwise with the running maximum m and normaliser l of the online softmax
(Milakov & Gimelshein 2018, arXiv 1805.02867; FlashAttention's rescaling, Dao et al. 2022, Alg. 1):

    m' = max(m, rowmax S),  l' = e^(m - m') l + rowsum e^(S - m'),  o' = e^(m - m') o + e^(S - m') V,

and the output is o / l after the last block. Gradients flow through the same loop (the transpose of a
ppermute is the ppermute the other way), so the backward pass is a ring too.

`ring_attention` is the per-device function (call it inside `jax.shard_map`); `sequence_parallel_attention`
shards [B, T, N, d] arrays over a mesh axis and pads T up to a multiple of the axis size (the padded keys
masked out, the padded queries dropped), so any sequence length works.

The models call `self_attention` (DiT's blocks, the self-attention of LDM's transformer blocks) and
`shard_tokens` (DiT's token stream): under a context mesh whose 'sequence' axis is larger than one
(`config.mesh.sequence`; the train and sample steps are traced under their mesh, `training.mesh.with_mesh`)
they are the ring and a [batch, sequence] sharding of the tokens, so the per-token layers (LayerNorm,
MLP, adaLN) run on each device's tokens only; anywhere else they are `jax.nn.dot_product_attention` and
the identity.
"""

import math

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh
from jax.sharding import PartitionSpec as P

from diffusion_jax.errors import ConfigError
from diffusion_jax.training.mesh import BATCH_AXES, SEQUENCE_AXIS


def ring_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array, *, axis_name: str, scale: float | None = None,
) -> jax.Array:
    """softmax(q kᵀ · scale) v over the whole ring, for this device's queries.

    Args:
        q, k, v: this device's blocks [B, T_b, N, d] of the queries, keys and values.
        key_mask: bool [B, T_b], True at this device's real keys (False: padding, never attended).
        axis_name: the mesh axis the sequence is split over (inside `jax.shard_map`).
        scale: the logits' scale; None: 1 / sqrt(d).

    Returns:
        [B, T_b, N, d] in q's dtype; a query with no real key anywhere gets zeros.
    """
    n = jax.lax.axis_size(axis_name)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    shift = [(i, (i + 1) % n) for i in range(n)]
    qf = q.astype(jnp.float32) * scale
    # The carries start as zeros made from q, so that they vary over the mesh axes q's block does (shard_map's
    # scan needs a carry's type, varying axes included, to be the same in and out).
    out = 0.0 * qf.transpose(0, 2, 1, 3)  # [B, N, T_b, d]
    normaliser = out[..., 0]  # [B, N, T_b]
    running_max = normaliser - jnp.inf

    def step(carry: tuple, _: None) -> tuple[tuple, None]:
        out, running_max, normaliser, k, v, key_mask = carry
        logits = jnp.einsum("bqhd,bkhd->bhqk", qf, k.astype(jnp.float32))  # [B, N, T_b, T_b]
        logits = jnp.where(key_mask[:, None, None, :], logits, -jnp.inf)
        # The output does not depend on m (it cancels in o / l): no gradient through it, as FlashAttention.
        new_max = jax.lax.stop_gradient(jnp.maximum(running_max, jnp.max(logits, axis=-1)))  # [B, N, T_b]
        safe_max = jnp.where(jnp.isfinite(new_max), new_max, 0.0)  # no real key seen yet: nothing to rescale
        weights = jnp.exp(logits - safe_max[..., None])  # exp(-inf) = 0 at masked keys
        decay = jnp.exp(jnp.where(jnp.isfinite(running_max), running_max - safe_max, -jnp.inf))
        out = decay[..., None] * out + jnp.einsum("bhqk,bkhd->bhqd", weights, v.astype(jnp.float32))
        normaliser = decay * normaliser + jnp.sum(weights, axis=-1)
        k, v, key_mask = (jax.lax.ppermute(x, axis_name, shift) for x in (k, v, key_mask))
        return (out, new_max, normaliser, k, v, key_mask), None

    (out, _, normaliser, *_), _ = jax.lax.scan(step, (out, running_max, normaliser, k, v, key_mask), None, length=n)
    out = jnp.where(normaliser[..., None] > 0, out / jnp.maximum(normaliser, 1e-30)[..., None], 0.0)
    return out.transpose(0, 2, 1, 3).astype(q.dtype)  # [B, T_b, N, d]


def sequence_parallel_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mesh: Mesh | jax.sharding.AbstractMesh, *, axis: str = SEQUENCE_AXIS,
    batch_axes: tuple[str, ...] = (), key_mask: jax.Array | None = None, scale: float | None = None,
) -> jax.Array:
    """Self-attention of q, k, v [B, T, N, d] with the tokens split over `mesh` axis `axis` (and the batch over
    `batch_axes`): `ring_attention` under `jax.shard_map`. T need not divide by the axis size: the sequence is
    padded up to a multiple of it, the pad keys masked out and the pad queries dropped. `key_mask` bool [B, T]
    (True: a real token; None: all) masks padding of the caller's own. Equals `jax.nn.dot_product_attention`
    with that mask, on one device, to fp32 rounding, in value and in gradient."""
    if axis not in mesh.axis_names:
        raise ConfigError(f"mesh.{axis}: sequence-parallel attention splits the tokens over mesh axis {axis!r}; "
                          f"this mesh has {tuple(mesh.axis_names)}")
    n = mesh.shape[axis]
    b, t = q.shape[:2]
    key_mask = jnp.ones((b, t), bool) if key_mask is None else key_mask.astype(bool)
    pad = -t % n
    if pad:
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
        key_mask = jnp.pad(key_mask, ((0, 0), (0, pad)))  # False: the pad keys are never attended
    batch = batch_axes or None
    tokens, mask_spec = P(batch, axis, None, None), P(batch, axis)
    attend = jax.shard_map(lambda q, k, v, m: ring_attention(q, k, v, m, axis_name=axis, scale=scale), mesh=mesh,
                           in_specs=(tokens, tokens, tokens, mask_spec), out_specs=tokens)
    return attend(q, k, v, key_mask)[:, :t]


def _sequence_mesh() -> jax.sharding.AbstractMesh | None:
    """The context mesh if it splits tokens (its 'sequence' axis larger than one), else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or dict(mesh.shape).get(SEQUENCE_AXIS, 1) == 1:
        return None
    return mesh


def _batch_axes(mesh: jax.sharding.AbstractMesh) -> tuple[str, ...]:
    """The batch axes XLA still splits (inside the shard_map train step they are manual: already split)."""
    types = dict(zip(mesh.axis_names, mesh.axis_types, strict=True))
    return tuple(axis for axis in BATCH_AXES if types.get(axis) == AxisType.Auto)


def self_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, implementation: str | None = None,
) -> jax.Array:
    """softmax(q kᵀ / sqrt(d)) v of a transformer's tokens [B, T, N, d]: `jax.nn.dot_product_attention`
    (`implementation` 'xla' / 'cudnn' / None), or ring attention over the context mesh's 'sequence' axis."""
    mesh = _sequence_mesh()
    if mesh is None:
        return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
    return sequence_parallel_attention(q, k, v, mesh, axis=SEQUENCE_AXIS, batch_axes=_batch_axes(mesh))


def shard_tokens(tokens: jax.Array) -> jax.Array:
    """tokens [B, T, D] constrained to the context mesh's [batch, sequence] split (identity without one)."""
    mesh = _sequence_mesh()
    if mesh is None:
        return tokens
    return jax.lax.with_sharding_constraint(tokens, P(_batch_axes(mesh) or None, SEQUENCE_AXIS, None))
