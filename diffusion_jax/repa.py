"""REPA: representation alignment (Yu et al. 2024, arXiv 2410.06940).

An auxiliary loss that makes the denoiser's hidden states at one layer, on the noisy input x_t it is trained on,
predictable from a frozen pretrained encoder's features of the clean image x_0 (Eq. 7-8):

    L_REPA = -E [ 1/N Σ_n cos(h_φ(h_t^[n]), y*^[n]) ],   L = L_diffusion + λ L_REPA,

h_t^[n] the backbone's token n at the chosen layer, h_φ a small trainable MLP (the projector; three linear
layers with SiLU, §3), y* = f(x_0) the encoder's patch features. The paper aligns SiT/DiT block 8 (of 28) with
DINOv2-B at λ = 0.5 and reaches the vanilla model's FID more than 17x sooner (Fig. 1).

Here the tap is `repa.layer` of a U-Net (the k-th down level's output, k = len(ch_mult) + 1 the middle
block) or a DiT (block k), projected by `Projector` to the encoder's width and sown as
`nnx.Intermediate('repa')` while training ([B, h, w, D], tokens on their spatial grid). The objective wrapper
`with_alignment` adds λ L_REPA to a one-forward-pass objective (`training.objective` 'denoise', 'edm',
'flow_matching'), area-pooling the tokens onto the encoder's grid. Encoders (`repa.encoder`): 'digits', the
frozen digits classifier (`metrics.digits`; its last conv layer, 4 x 4 x 32 on the 8 x 8 digit); 'dinov2', the
paper's DINOv2 (`models.dinov2`, Oquab et al. 2023) from the Hugging Face checkpoint at `repa.encoder_path`: its
normalised patch tokens of x_0 resized to `repa.encoder_resolution` (REPA's 224 for 256 px images: 16 x 16 x D,
D = 768 for DINOv2-B/14).
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.typing import DTypeLike

from diffusion_jax import inverse
from diffusion_jax.errors import ConfigError

ENCODERS = ("digits", "dinov2")
RESOLUTION = 224  # DINOv2's input size in REPA (256 px images resized for DINOv2-B/14: 16 x 16 tokens)
OBJECTIVES = ("denoise", "edm", "flow_matching")  # one network call on x_t per loss, which the tap records


class Encoder(NamedTuple):
    """A frozen feature encoder: `apply(params, x0)`, x_0 [B, H, W, C] in [-1, 1] -> features [B, h, w, D] with
    D = `width`, and its `params`. The train step receives the params as an argument (`Objective.frozen`), so
    XLA does not embed the weights in the program as constants (DINOv2-B: 661 MB of StableHLO, not 1.6)."""

    apply: Callable[[Any, jax.Array], jax.Array]
    params: Any
    width: int

    def __call__(self, x0: jax.Array) -> jax.Array:
        """`apply` with the encoder's own params (outside the train step)."""
        return self.apply(self.params, x0)


class Projector(nnx.Module):
    """h_φ: a per-token MLP `in_dim` -> `hidden` -> `hidden` -> `out_dim` with SiLU between (REPA §3)."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 256, *, rngs: nnx.Rngs,
                 dtype: DTypeLike = jnp.float32):
        self.fc1 = nnx.Linear(in_dim, hidden, rngs=rngs, dtype=dtype)
        self.fc2 = nnx.Linear(hidden, hidden, rngs=rngs, dtype=dtype)
        self.fc3 = nnx.Linear(hidden, out_dim, rngs=rngs, dtype=dtype)

    def __call__(self, h: jax.Array) -> jax.Array:
        """[..., in_dim] -> [..., out_dim]."""
        return self.fc3(nnx.silu(self.fc2(nnx.silu(self.fc1(h)))))


def weight(config: ml_collections.ConfigDict) -> float:
    """λ (`repa.weight`; a config without the section, such as an older run's: 0, off)."""
    return float(config.get("repa", {}).get("weight", 0.0))


def check_layer(layer: int | None, num_layers: int, what: str) -> None:
    """A ConfigError unless `layer` is one of the backbone's `num_layers` taps (1-based)."""
    if not isinstance(layer, int) or not 1 <= layer <= num_layers:
        raise ConfigError(f"repa.layer: {layer!r}; this backbone's taps are 1..{num_layers} ({what})")


def encoder_width(name: str, path: str | None = None) -> int:
    """The feature width D of encoder `name` (what the projector maps to), without loading it; 'dinov2' reads it
    from the checkpoint at `path` (`repa.encoder_path`)."""
    check_encoder(name)
    if name == "dinov2":
        from diffusion_jax.convert import dinov2

        return dinov2.width(_dinov2_path(path))
    return 32  # 'digits': metrics.digits.SPATIAL_FEATURE_DIM


def check_encoder(name: str) -> None:
    if name not in ENCODERS:
        raise ConfigError(f"repa.encoder: unknown {name!r}; choose one of: {', '.join(ENCODERS)}")


def pool_to_grid(tokens: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """Area-average square tokens [B, h, h, D] onto an encoder's coarser square grid [B, g, g, D] (h a multiple of
    g; `inverse.area_downsample`)."""
    h, w = tokens.shape[1:3]
    gh, gw = grid
    if h != w or gh != gw or h % gh:
        raise ConfigError(f"repa.layer: its tokens lie on a {h}x{w} grid, which does not pool onto the "
                          f"encoder's {gh}x{gw}; choose a layer whose resolution is a multiple of it")
    return inverse.area_downsample(tokens, gh)


def alignment_loss(projected: jax.Array, target: jax.Array) -> jax.Array:
    """-mean over examples and tokens of cos(projected, target), [B, h, w, D] each (Eq. 8)."""
    def unit(v: jax.Array) -> jax.Array:
        v = v.astype(jnp.float32)
        return v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-6)

    return -jnp.mean(jnp.sum(unit(projected) * unit(target), axis=-1))


def digits_encoder() -> Encoder:
    """The frozen digits classifier's spatial features (its third conv layer after ReLU, [B, 4, 4, 32]) of
    x_0 [B, S, S, 1], S >= 8, brought to the classifier's 8 x 8 by `metrics.digits`' least-squares downsampling."""
    from diffusion_jax.metrics import digits  # the metrics' weights load on first use, not at import

    graphdef, params = nnx.split(digits.default_evaluator().classifier())

    def apply(params: nnx.State, x0: jax.Array) -> jax.Array:
        size = x0.shape[1]
        if x0.ndim != 4 or x0.shape[-1] != 1 or size < digits.NATIVE_SIZE:
            raise ConfigError(f"repa.encoder: 'digits' reads greyscale digits [B, S, S, 1], S >= 8; the data are "
                              f"{list(x0.shape[1:])}")
        native = digits.downsample_to_native(x0.astype(jnp.float32))  # [B, 8, 8, 1]
        return jax.lax.stop_gradient(nnx.merge(graphdef, params).spatial_features(native))

    return Encoder(apply, params, digits.SPATIAL_FEATURE_DIM)


def _dinov2_path(path: str | None) -> str:
    if not path:
        raise ConfigError(f"repa.encoder_path: {path!r}; repa.encoder='dinov2' reads a Hugging Face DINOv2 "
                          "checkpoint (facebook/dinov2-base's model.safetensors, or its folder)")
    return path


def dinov2_encoder(path: str | None, resolution: int = RESOLUTION) -> Encoder:
    """DINOv2's normalised patch tokens [B, r/p, r/p, D] of x_0 [B, H, W, C] (C = 1 or 3), preprocessed as REPA:
    [-1, 1] -> [0, 1], greyscale repeated to RGB, resized to r = `resolution` (antialiased bicubic), normalised by
    ImageNet's mean and std. The weights come from `path` (`convert.dinov2.load`)."""
    from diffusion_jax.convert import dinov2
    from diffusion_jax.models.dinov2 import IMAGENET_MEAN, IMAGENET_STD

    model = dinov2.load(_dinov2_path(path))
    if resolution % model.patch_size:
        raise ConfigError(f"repa.encoder_resolution: {resolution} is not a multiple of the encoder's patch size "
                          f"{model.patch_size} (REPA's {RESOLUTION})")
    mean, std = jnp.asarray(IMAGENET_MEAN), jnp.asarray(IMAGENET_STD)
    graphdef, params = nnx.split(model)

    def apply(params: nnx.State, x0: jax.Array) -> jax.Array:
        if x0.ndim != 4 or x0.shape[-1] not in (1, 3):
            raise ConfigError(f"repa.encoder: 'dinov2' reads greyscale or RGB images [B, H, W, 1 or 3]; the data are "
                              f"{list(x0.shape[1:])}")
        x = jnp.broadcast_to((x0.astype(jnp.float32) + 1) / 2, (*x0.shape[:3], 3))  # [B, H, W, 3] in [0, 1]
        x = jax.image.resize(x, (x.shape[0], resolution, resolution, 3), "bicubic", antialias=True)
        return jax.lax.stop_gradient(nnx.merge(graphdef, params)((x - mean) / std))  # [B, r/p, r/p, D]

    return Encoder(apply, params, model.norm.scale.shape[0])


def encoder(name: str, path: str | None = None, resolution: int = RESOLUTION) -> Encoder:
    """The frozen encoder of `repa.encoder`; 'dinov2' from the checkpoint at `path` (`repa.encoder_path`) at
    `resolution` (`repa.encoder_resolution`)."""
    check_encoder(name)
    return dinov2_encoder(path, resolution) if name == "dinov2" else digits_encoder()


def sown_features(modules: list[nnx.Module]) -> jax.Array:
    """The one [B, h, w, D] projection the tapped backbone sowed during the loss's forward pass."""
    sown = [leaf for module in modules for leaf in jax.tree.leaves(nnx.pop(module, nnx.Intermediate))]
    if len(sown) != 1:
        raise ConfigError(f"repa.weight: REPA aligns the one forward pass of the loss; this objective's loss made "
                          f"{len(sown)} tapped passes (objectives with one: {', '.join(OBJECTIVES)})")
    return sown[0]
