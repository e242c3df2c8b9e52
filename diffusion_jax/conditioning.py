"""Conditioning as one pytree, and its null condition (DESIGN §6).

A model's `cond` is a dict holding any of

    label         int [B]          class labels; the null label is `num_classes`
    tokens        int [B, L]       token ids for a model with its own text encoder ...
    token_mask    bool [B, L]      ... True at real tokens
    context       float [B, L, D]  a token sequence for cross-attention (e.g. saved CLIP/T5 outputs) ...
    context_mask  bool [B, L]      ... True at real tokens
    pooled        float [B, D]     one embedding added to the time embedding (GLIDE, unCLIP, Imagen, SDXL)
    low_res       float [B, h, w, C]  a low-resolution image a super-resolution model is conditioned on (SR3) ...
    low_res_noise float [B]        ... and the level of the noise it was augmented with (CDM; 0 = clean)
    control       float [B, H, W, C_c]  a ControlNet's control image (edges, a coarse mask)
    interval      float [B]        the interval h = t - r of a MeanFlow network's average velocity u(z, r, t), in
                                   the backbone's time units, set by its wrapper from (t, r) (`models.Preconditioned`)

or a bare int array, which means {'label': array} (the form class-conditional code has always
used), or None (every entry null). Every entry has a null value, and `null` makes it: the null
label, an all-False mask (an empty sequence, which the cross-attention reads as "no context"),
a zero pooled embedding, zeros for the image entries; an interval is the network's argument and stays.
So classifier-free guidance (`guidance.classifier_free`) and its training-time dropout (`drop`) are written
once for labels, text, precomputed embeddings and images.
A whole condition is dropped together: an example is either fully conditional or fully null.
"""

import jax
import jax.numpy as jnp

Cond = dict[str, jax.Array] | jax.Array | None

KEYS = ("label", "tokens", "token_mask", "context", "context_mask", "pooled", "low_res", "low_res_noise", "control",
        "interval")
_MASK_OF = {"tokens": "token_mask", "context": "context_mask"}


def as_dict(cond: Cond) -> dict[str, jax.Array]:
    """`cond` as a dict: None -> {}, an array -> {'label': array}; unknown keys are a ValueError."""
    if cond is None:
        return {}
    if not isinstance(cond, dict):
        return {"label": cond}
    unknown = sorted(set(cond) - set(KEYS))
    if unknown:
        raise ValueError(f"cond: unknown entries {unknown}; a condition holds any of {list(KEYS)}")
    return dict(cond)


def with_masks(cond: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Adds an all-True mask to a token sequence given without one."""
    out = dict(cond)
    for sequence, mask in _MASK_OF.items():
        if sequence in out and mask not in out:
            out[mask] = jnp.ones(out[sequence].shape[:2], bool)
    return out


def _null_entry(key: str, value: jax.Array, null_label: int | None) -> jax.Array:
    if key == "label":
        if null_label is None:
            raise ValueError("cond: a label's null condition needs the model's null label (model.num_classes)")
        return jnp.full_like(value, null_label)
    if key in ("token_mask", "context_mask"):
        return jnp.zeros_like(value)
    if key in ("pooled", "low_res", "low_res_noise", "control"):
        return jnp.zeros_like(value)
    return value  # tokens, context: masked out by their all-False masks; interval: an argument, not a condition


def null(cond: Cond, null_label: int | None = None) -> Cond:
    """The null condition shaped like `cond` (same type: array, dict or None)."""
    if cond is None:
        return None
    if not isinstance(cond, dict):
        return _null_entry("label", cond, null_label)
    full = with_masks(as_dict(cond))
    return {k: _null_entry(k, v, null_label) for k, v in full.items()}


def drop(key: jax.Array, cond: Cond, rate: float, null_label: int | None = None) -> Cond:
    """Replaces each example's whole condition by the null one with probability `rate` (independently
    per example): classifier-free guidance's joint training (Ho & Salimans 2022, §3.2, p_uncond)."""
    if cond is None or rate <= 0:
        return cond
    full = cond if not isinstance(cond, dict) else with_masks(as_dict(cond))
    nulled = null(full, null_label)
    batch = jax.tree.leaves(full)[0].shape[0]
    dropped = jax.random.bernoulli(key, rate, (batch,))

    def pick(value: jax.Array, empty: jax.Array) -> jax.Array:
        return jnp.where(dropped.reshape((batch,) + (1,) * (value.ndim - 1)), empty, value)

    return jax.tree.map(pick, full, nulled)


def concat(a: Cond, b: Cond) -> Cond:
    """Two conditions of batches B_a and B_b as one of B_a + B_b (both with the same entries)."""
    if a is None:
        return None
    if isinstance(a, dict):
        a, b = with_masks(a), with_masks(b)
    return jax.tree.map(lambda x, y: jnp.concatenate([x, y]), a, b)


def batch_size(cond: Cond) -> int | None:
    """The batch size of a condition (None for None)."""
    leaves = jax.tree.leaves(cond)
    return leaves[0].shape[0] if leaves else None
