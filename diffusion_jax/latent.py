"""Latent diffusion: a diffusion model in the latent space of a frozen autoencoder (Rombach et al. 2022).

LDM (arXiv 2112.10752, §3.2) trains the denoiser on z = s · E(x), where E is a first stage trained
before (`training.objective='autoencode'`, `models.FirstStage`), z a sample of its posterior
q(z|x), and s the scale factor that gives the latents unit variance: §4.3.2 and Appendix D.1 set
s = 1 / std(z) from the first batch of the training data (Stable Diffusion's VAE: s = 0.18215).
Samples are decoded as x = D(z / s). The diffusion model, its sampler and its guidance are the
codebase's own and never see pixels; nothing else changes.

Config (`config.latent`):
  autoencoder_workdir  the workdir of a first-stage run (its checkpoint's config and weights are
                       read with `diffusion_jax.load`; the run's raw, non-EMA weights unless its
                       `sample.ema_decay` says otherwise); None: a pixel-space model
  scale_factor         s; None: computed from the first training batch at the first start and then
                       stored in the run's config (so in every checkpoint), which sample and eval
                       modes and resumes read back
  sample_posterior     train on samples of q(z|x) (LDM) or on its mean
"""

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from diffusion_jax import data
from diffusion_jax.data import latent_cache
from diffusion_jax.errors import ConfigError
from diffusion_jax.models.autoencoder import DiagonalGaussian


class FirstStage(NamedTuple):
    """A frozen autoencoder of a latent diffusion run and its latent scale factor."""

    graphdef: nnx.GraphDef  # of the AutoencoderKL
    params: nnx.State
    scale_factor: float | None  # s of z = s * E(x); None until computed from data
    image_shape: tuple[int, int, int]  # [H, W, C] pixels
    latent_shape: tuple[int, int, int]  # [H/f, W/f, c]
    workdir: str
    step: int  # of the autoencoder's checkpoint

    def encode(self, images: jax.Array, key: jax.Array, sample_posterior: bool = True) -> jax.Array:
        """s · z with z ~ q(z|x) (or its mean): images [B, H, W, C] in [-1, 1] -> latents [B, h, w, c]."""
        return self.latents(nnx.merge(self.graphdef, self.params).encode(images), key, sample_posterior)

    def latents(self, posterior: DiagonalGaussian, key: jax.Array, sample_posterior: bool = True) -> jax.Array:
        """s · z with z ~ `posterior` (or its mean): [B, h, w, c]."""
        z = posterior.sample(key) if sample_posterior else posterior.mode()
        return z * self._scale()

    def decode(self, latents: jax.Array) -> jax.Array:
        """D(z / s): latents [B, h, w, c] -> images [B, H, W, C] (clipped to [-1, 1])."""
        images = nnx.merge(self.graphdef, self.params).decode(latents / self._scale())
        return jnp.clip(images, -1.0, 1.0)

    def _scale(self) -> float:
        if self.scale_factor is None:
            raise ConfigError(
                f"latent.scale_factor: missing; it is computed from the data when training starts in a new workdir "
                f"(latent.autoencoder_workdir={self.workdir}), or set it (Stable Diffusion's VAE: 0.18215)"
            )
        return self.scale_factor


def load_first_stage(
    config: ml_collections.ConfigDict, image_shape: tuple[int, ...], sharding: jax.sharding.Sharding | None = None
) -> FirstStage | None:
    """The frozen autoencoder of `config.latent.autoencoder_workdir` (None for a pixel-space run), its
    parameters placed with `sharding` (the training mesh's replicated sharding; default the first device).

    One-line ConfigErrors name `latent.autoencoder_workdir` for a workdir without a checkpoint or
    one that is not a first-stage run, and `data.image_size` for images the autoencoder cannot take.
    """
    from diffusion_jax.loading import load  # loading builds on training.setup, which imports this module

    latent = config.get("latent") or {}
    workdir = latent.get("autoencoder_workdir")
    if workdir is None:
        return None
    field = "latent.autoencoder_workdir"
    loaded = load(workdir, field=field, sharding=sharding)
    if loaded.config.training.get("objective") != "autoencode":
        raise ConfigError(f"{field}: {workdir} is not a first-stage run (its training.objective is "
                          f"{loaded.config.training.get('objective')!r}, not 'autoencode')")
    autoencoder = nnx.merge(loaded.graphdef, loaded.params).autoencoder
    graphdef, params = nnx.split(autoencoder)
    if len(image_shape) != 3 or image_shape[-1] != autoencoder.in_channels:
        raise ConfigError(f"data: images {tuple(image_shape)} do not fit the autoencoder of {workdir}, which takes "
                          f"{autoencoder.in_channels} channels")
    f = autoencoder.downsampling_factor
    height, width, _ = image_shape
    if height % f or width % f:
        raise ConfigError(f"data.image_size: {height} is not a multiple of the autoencoder's downsampling factor {f}")
    if tuple(loaded.example_shape) != tuple(image_shape):
        raise ConfigError(f"data.image_size: the autoencoder of {workdir} was trained on {loaded.example_shape} "
                          f"images; this run's are {tuple(image_shape)}")
    latent_shape = (height // f, width // f, autoencoder.latent_channels)
    return FirstStage(graphdef, params, latent.get("scale_factor"), tuple(image_shape), latent_shape, str(workdir),
                      loaded.step)


def adopt_saved_scale_factor(config: ml_collections.ConfigDict, workdir: str | Path) -> None:
    """Sample and eval modes: a latent run's `latent.scale_factor`, if the command line left it None, from the
    newest checkpoint's config (where training stored the one it computed)."""
    from diffusion_jax.training.checkpoint import Checkpointer

    latent = config.get("latent")
    if latent is None or latent.get("autoencoder_workdir") is None or latent.get("scale_factor") is not None:
        return
    checkpointer = Checkpointer(Path(workdir) / "checkpoints")
    try:
        for step in reversed(checkpointer.all_steps()):
            saved = checkpointer.saved_config(step)
            if saved is not None and (saved.get("latent") or {}).get("scale_factor") is not None:
                config.latent.scale_factor = saved["latent"]["scale_factor"]
                return
    finally:
        checkpointer.close()


def scale_factor_from_data(
    config: ml_collections.ConfigDict, first_stage: FirstStage, sharding: jax.sharding.Sharding, key: jax.Array
) -> float:
    """LDM's s = 1 / std(z) over the first training batch's posterior samples z ~ q(z|x) (§4.3.2, App. D.1)."""
    batch = next(training_batches(config, first_stage._replace(scale_factor=1.0), sharding, 0, key))
    return float(1.0 / np.std(np.asarray(jax.device_get(batch["image"])), dtype=np.float64))


def decoding(sample_fn: Callable, first_stage: FirstStage) -> Callable:
    """`sample_fn(params, key, inputs) -> (latents, nfe)` made to return decoded images D(z / s) instead."""
    first_stage._scale()  # a missing scale factor is a ConfigError now, not at the first sample
    decode = jax.jit(lambda params, z: first_stage._replace(params=params).decode(z))

    def sample(params: nnx.State, key: jax.Array, inputs: dict | None = None) -> tuple[jax.Array, jax.Array]:
        latents, nfe = sample_fn(params, key, inputs)
        return decode(first_stage.params, latents), nfe

    return sample


def training_batches(
    config: ml_collections.ConfigDict, first_stage: FirstStage, sharding: jax.sharding.Sharding, start_step: int,
    key: jax.Array,
) -> Iterator[dict[str, jax.Array]]:
    """The run's batches (`data.create_iterator`) with 'image' = s · z, z ~ q(z|x) of each image (labels and
    tokens as they are): encoded on the fly, or drawn from the moments of `latent.cache_dir`.

    Both draw the posterior sample of step s with fold_in(key, s) over the whole global batch, so a resumed
    run, and a cached run, see the same latents as an uninterrupted, encoding one.
    """
    latent = config.latent
    sample_posterior = latent.get("sample_posterior", True)
    cache = None
    if latent.get("cache_dir") is not None:
        cache = latent_cache.open_cache(latent.cache_dir, config, first_stage.workdir, first_stage.step,
                                        first_stage.latent_shape)
    batches = data.create_iterator(config.data, global_batch_size=config.training.batch_size, seed=config.seed,
                                   start_step=start_step, sharding=sharding, latent_cache=cache)
    if cache is None:
        to_latents = jax.jit(lambda params, images, k: first_stage._replace(params=params).encode(
            images, k, sample_posterior))
        for step, batch in enumerate(batches, start=start_step):
            yield batch | {"image": to_latents(first_stage.params, batch["image"], jax.random.fold_in(key, step))}
    else:
        from_moments = jax.jit(lambda moments, k: first_stage.latents(
            DiagonalGaussian.from_moments(moments), k, sample_posterior))
        for step, batch in enumerate(batches, start=start_step):
            moments = batch.pop("moments")
            yield batch | {"image": from_moments(moments, jax.random.fold_in(key, step))}
