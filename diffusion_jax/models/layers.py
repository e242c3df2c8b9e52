"""Building blocks shared by the denoising networks (U-Net, MLP, and later DiT).

Time enters every model the same way: a sinusoidal embedding of the timestep
(Vaswani et al. 2017, §3.5, as used by Ho et al. 2020, arXiv 2006.11239,
Appendix B) followed by a two-layer MLP. Class labels are added to that vector
through an embedding table with one extra row, the null label used by
classifier-free guidance (Ho & Salimans 2022, arXiv 2207.12598).
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import DTypeLike

from diffusion_jax import conditioning
from diffusion_jax.models.bias import Linear
from diffusion_jax.models.norm import GroupNorm

# Ho et al.'s `default_init` (diffusion_tf/nn.py): variance scaling 1.0, fan_avg, uniform.
default_init = nnx.initializers.variance_scaling(1.0, "fan_avg", "uniform")
zeros_init = nnx.initializers.zeros_init()


def linear(
    in_features: int,
    out_features: int,
    *,
    zero_init: bool = False,
    rngs: nnx.Rngs,
    dtype: DTypeLike = jnp.float32,
) -> Linear:
    """A dense layer with Ho et al.'s initialisation; `zero_init` for output projections."""
    return Linear(
        in_features,
        out_features,
        kernel_init=zeros_init if zero_init else default_init,
        dtype=dtype,
        rngs=rngs,
    )


def group_norm(channels: int, *, eps: float = 1e-6, rngs: nnx.Rngs, dtype: DTypeLike = jnp.float32) -> GroupNorm:
    """GroupNorm (Wu & He 2018) with gcd(32, channels) groups and epsilon `eps`.

    That is the 32 groups of Ho et al. and ADM whenever `channels` is a multiple
    of 32, and still a valid grouping for the narrow models used in tests
    (8 channels -> 8 groups, 48 -> 16). `eps`: 1e-6 as Ho et al.'s TF code; Stable
    Diffusion's U-Net uses PyTorch's 1e-5 (diffusers' `norm_eps`). The module is `models.norm.GroupNorm`:
    `nnx.GroupNorm`'s parameters and numerics, taking ADM's scale-shift and SiLU in the same call.
    """
    return GroupNorm(channels, num_groups=math.gcd(32, channels), epsilon=eps, dtype=dtype, rngs=rngs)


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0, freq_shift: float = 0.0) -> jax.Array:
    """Sinusoidal embedding of timesteps, as in ADM's `timestep_embedding`.

    emb[:, i] = cos(t * f_i), emb[:, half + i] = sin(t * f_i), with
    f_i = max_period ** (-i / (half - freq_shift)) and half = dim // 2 (Vaswani et al. 2017, §3.5;
    Ho et al. 2020, Appendix B). An odd `dim` gets a trailing zero column.

    Args:
        t: [B] timesteps, integer indices or continuous times; used as given.
        dim: width of the embedding.
        max_period: the longest wavelength, controlling the lowest frequency.
        freq_shift: 0 as ADM, DiT and Stable Diffusion; 1 as Ho et al.'s TF code (`get_timestep_embedding`
            divides by half - 1), and so diffusers' `freq_shift=1` of google/ddpm-*.

    Returns:
        [B, dim] float32 embedding.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))  # [half]
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]  # [B, half]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)  # [B, 2*half]
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))  # [B, dim]
    return emb


class TimestepEmbedder(nnx.Module):
    """t -> sinusoid(dim) -> Linear(dim, emb_dim) -> SiLU -> Linear(emb_dim, emb_dim).

    Ho et al. 2020 (diffusion_tf/models/unet.py, 'temb') with dim = ch and
    emb_dim = 4 * ch.
    """

    def __init__(
        self, dim: int, emb_dim: int, *, freq_shift: float = 0.0, rngs: nnx.Rngs, dtype: DTypeLike = jnp.float32
    ):
        self.dim, self.freq_shift = dim, freq_shift
        self.dense0 = linear(dim, emb_dim, rngs=rngs, dtype=dtype)
        self.dense1 = linear(emb_dim, emb_dim, rngs=rngs, dtype=dtype)

    def __call__(self, t: jax.Array) -> jax.Array:
        """[B] timesteps -> [B, emb_dim]."""
        return self.dense1(nnx.silu(self.dense0(timestep_embedding(t, self.dim, freq_shift=self.freq_shift))))


class LabelEmbedder(nnx.Module):
    """Class labels -> [B, emb_dim] through `nnx.Embed(num_classes + 1, emb_dim)`.

    Row `num_classes` is the null label of classifier-free guidance (Ho & Salimans
    2022): the unconditional model is the same network given that label.
    """

    def __init__(self, num_classes: int, emb_dim: int, *, rngs: nnx.Rngs, dtype: DTypeLike = jnp.float32):
        self.num_classes = num_classes
        self.embed = nnx.Embed(num_classes + 1, emb_dim, dtype=dtype, rngs=rngs)

    @property
    def null_label(self) -> int:
        """The label that means 'no class' (the last row of the table)."""
        return self.num_classes

    def __call__(self, labels: jax.Array | None, batch: int) -> jax.Array:
        """[B] int labels in 0..num_classes (None: all null) -> [B, emb_dim]."""
        if labels is None:
            labels = jnp.full((batch,), self.null_label, dtype=jnp.int32)
        return self.embed(labels)


class ConditionEmbedder(nnx.Module):
    """The conditioning vector of ADM (Dhariwal & Nichol 2021): emb = temb(t) + label_emb(y),
    plus, with `pooled_dim`, a linear map of a pooled text embedding (GLIDE, Nichol et al. 2022,
    arXiv 2112.10741, §2.3; unCLIP, Imagen and SDXL add theirs the same way), and with `low_res_noise` a second
    timestep embedding of a super-resolution model's conditioning-augmentation level s ∈ [0, 1] (CDM, Ho et al.
    2021, arXiv 2106.15282, §4.3: the model is told how noisy its low-resolution input is), of 1000 s so that it
    spans the frequencies the timestep embedding was designed for; and with `interval` a third, of the interval
    h = t - r of a MeanFlow network u(z, r, t) (Geng et al. 2025, arXiv 2505.13447, §4.3: the time embedding
    of (t, t - r)), `cond['interval']` [B] in the units of the time input t (the wrapper scales both).

    Without `num_classes` the model is unconditional and rejects labels; without `pooled_dim`
    it rejects a pooled embedding. A missing entry is the null condition (`diffusion_jax.conditioning`).
    """

    def __init__(
        self,
        dim: int,
        emb_dim: int,
        num_classes: int | None,
        *,
        pooled_dim: int | None = None,
        freq_shift: float = 0.0,
        low_res_noise: bool = False,
        interval: bool = False,
        rngs: nnx.Rngs,
        dtype: DTypeLike = jnp.float32,
    ):
        self.time = TimestepEmbedder(dim, emb_dim, freq_shift=freq_shift, rngs=rngs, dtype=dtype)
        self.label = None if num_classes is None else LabelEmbedder(num_classes, emb_dim, rngs=rngs, dtype=dtype)
        self.pooled = None if pooled_dim is None else linear(pooled_dim, emb_dim, rngs=rngs, dtype=dtype)
        self.low_res_noise = TimestepEmbedder(dim, emb_dim, rngs=rngs, dtype=dtype) if low_res_noise else None
        self.interval = TimestepEmbedder(dim, emb_dim, rngs=rngs, dtype=dtype) if interval else None

    def __call__(self, t: jax.Array, cond: conditioning.Cond) -> jax.Array:
        """[B] timesteps and a condition (labels [B], a dict with 'label' and 'pooled' [B, D], or None)
        -> [B, emb_dim]."""
        entries = conditioning.as_dict(cond)
        if self.label is None and "label" in entries:
            raise ValueError("cond: class labels were given to a model built without model.num_classes")
        if self.pooled is None and "pooled" in entries:
            raise ValueError("cond: a pooled embedding was given to a model built without model.pooled_dim")
        if self.low_res_noise is None and ("low_res" in entries or "low_res_noise" in entries):
            raise ValueError("cond: a low-resolution image was given to a model built without model.low_res_size")
        if self.interval is None and "interval" in entries:
            raise ValueError("cond: an interval t - r was given to a model built without an interval embedding "
                             "(training.objective='meanflow' builds one)")
        emb = self.time(t)  # [B, emb_dim]
        if self.label is not None:
            emb = emb + self.label(entries.get("label"), t.shape[0])
        if self.pooled is not None:  # a missing pooled embedding is the null one, zeros
            pooled = entries.get("pooled")
            if pooled is None:
                pooled = jnp.zeros((t.shape[0], self.pooled.in_features), emb.dtype)
            emb = emb + self.pooled(pooled)
        if self.low_res_noise is not None:  # a missing level is the null one, 0: a clean low-resolution image
            level = entries.get("low_res_noise", jnp.zeros((t.shape[0],), jnp.float32))  # [B]
            emb = emb + self.low_res_noise(1000.0 * level)
        if self.interval is not None:  # a missing interval is 0: the instantaneous velocity u(z, t, t) = v(z, t)
            interval = entries.get("interval", jnp.zeros((t.shape[0],), jnp.float32))  # [B]
            emb = emb + self.interval(interval)
        return emb
