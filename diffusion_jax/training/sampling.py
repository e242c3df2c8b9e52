"""Drawing samples from a trained model and writing them where a person can look.

`<workdir>/samples/samples_<step>.png` is a grid (or a scatter plot for 2-D data)
and `samples_<step>.npz` holds `arr_0`: uint8 [N, H, W, C] images, the layout the
ADM (guided-diffusion) evaluator reads, or float32 [N, D] points.
"""

import functools
import math
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from PIL import Image

from diffusion_jax import conditioning, distributed, editing, guidance, sde
from diffusion_jax.data import captions
from diffusion_jax.errors import ConfigError
from diffusion_jax.loading import LoadedModel, check_guide, load
from diffusion_jax.super_resolution import nearest_upsample
from diffusion_jax.training import mesh as mesh_lib
from diffusion_jax.training.setup import (
    Process,
    RunProcess,
    bind_process,
    guided_channels,
    model_apply,
    network_output_fn,
    process_memo,
    sampler_from_config,
)

# (params, key, inputs) -> (x_0 [B, ...], NFE: int32 [] network evaluations the sampler used); `inputs`
# (`editing.sample_inputs`, [B, ...] each, or None for the function's own) are what an edit or a conditioning
# image needs.
SampleFn = Callable[[nnx.State, jax.Array, dict[str, np.ndarray] | None], tuple[jax.Array, jax.Array]]


class Classifier(NamedTuple):
    """A trained noise-aware classifier: the model's graphdef, its parameters and its classes."""

    graphdef: nnx.GraphDef
    params: nnx.State
    num_classes: int


def load_classifier(
    config: ml_collections.ConfigDict, example_shape: tuple[int, ...], sharding: NamedSharding
) -> Classifier | None:
    """The classifier of `sample.classifier_workdir` (None when unset), restored and replicated.

    That workdir's newest checkpoint gives the model, the config it was trained with and the
    weights (the EMA its own `sample.ema_decay` names; `diffusion_jax.load`). It must be a
    `training.objective='classify'` run on this run's data shape and noise schedule, since the
    classifier is called at the diffusion model's times t; anything else is a one-line ConfigError
    naming `sample.classifier_workdir`.
    """
    workdir = config.sample.get("classifier_workdir")
    if workdir is None:
        return None
    field = f"sample.classifier_workdir: {workdir}"
    loaded = load(workdir, sharding=mesh_lib.replicated(sharding.mesh), field="sample.classifier_workdir")
    cls_config = loaded.config
    objective = cls_config.training.get("objective", "denoise")
    if objective != "classify":
        raise ConfigError(f"{field} is not a classifier run (its training.objective is {objective!r}, not 'classify')")
    ours = (config.diffusion.schedule, config.diffusion.num_timesteps)
    theirs = (cls_config.diffusion.schedule, cls_config.diffusion.num_timesteps)
    if theirs != ours:
        raise ConfigError(
            f"{field} holds a classifier of diffusion.schedule={theirs[0]!r}, num_timesteps={theirs[1]}; "
            f"guiding this model needs the same noise levels ({ours[0]!r}, {ours[1]})"
        )
    if loaded.example_shape != tuple(example_shape):
        raise ConfigError(
            f"{field} holds a classifier of inputs {loaded.example_shape}; this model makes {tuple(example_shape)}"
        )
    return Classifier(loaded.graphdef, loaded.params, int(cls_config.model.num_classes))


def load_guide(
    config: ml_collections.ConfigDict, example_shape: tuple[int, ...], sharding: NamedSharding
) -> LoadedModel | None:
    """The autoguidance model of `sample.guide_workdir` (None when unset): its checkpoint of `sample.guide_step`
    (default the newest), the EMA its own config samples with, replicated; checked by `loading.check_guide`."""
    workdir = config.sample.get("guide_workdir")
    if workdir is None:
        return None
    if config.sample.get("guidance_scale") is None:
        raise ConfigError("sample.guide_workdir: autoguidance needs sample.guidance_scale (s = 1 + w; s > 1 guides "
                          "away from the guide, 1 is the model alone)")
    guide = load(workdir, step=config.sample.get("guide_step"), sharding=mesh_lib.replicated(sharding.mesh),
                 field="sample.guide_workdir")
    check_guide(config, example_shape, guide, f"sample.guide_workdir: {workdir}")
    return guide


def _no_samples(params: nnx.State, key: jax.Array, inputs: dict | None = None) -> jax.Array:
    raise ConfigError(
        "training.objective: a 'classify' run trains a noise-aware classifier and draws no samples; "
        "use its workdir as sample.classifier_workdir of a diffusion run"
    )


def _reconstruction_fn(graphdef: nnx.GraphDef, config: ml_collections.ConfigDict, sharding: NamedSharding) -> SampleFn:
    """A first-stage run's "samples": held-out images next to their reconstructions through the posterior
    mean, [x_1, D(E(x_1)), x_2, D(E(x_2)), ...] ([sample.batch_size] in all; the test split's first images)."""
    from diffusion_jax.data import load_split  # the data pipeline, only for this run kind

    half = config.sample.batch_size // 2
    images, _ = load_split(config.data, "test")
    held_out = jnp.asarray(images[:half].astype(np.float32) / 127.5 - 1.0)  # [B/2, H, W, C]

    def reconstruct(params: nnx.State, key: jax.Array, inputs: dict | None = None) -> tuple[jax.Array, jax.Array]:
        x_rec, _ = nnx.merge(graphdef, params).autoencoder(held_out, sample_posterior=False)
        pairs = jnp.stack([held_out, jnp.clip(x_rec, -1.0, 1.0)], axis=1).reshape(2 * half, *held_out.shape[1:])
        return pairs, jnp.ones((), jnp.int32)

    return jax.jit(reconstruct, out_shardings=(mesh_lib.replicated(sharding.mesh), mesh_lib.replicated(sharding.mesh)))


def make_sample_fn(
    graphdef: nnx.GraphDef,
    schedule: RunProcess,
    config: ml_collections.ConfigDict,
    example_shape: tuple[int, ...],
    sharding: NamedSharding,
) -> SampleFn:
    """A jitted `sample(params, key) -> x_0 [sample.batch_size, *example_shape]` (and `.lower(params, key)`).

    The whole chain is one compiled program (the sampler's `lax.scan`), compiled
    once and reused; the batch is split over the mesh's batch axes, each device's examples computed
    without a collective (the noise is drawn for the whole batch with threefry's partitionable bits, so the
    samples are the same on any number of devices). Class-
    conditional models get labels 0, 1, 2, ... cycling over the classes, and with
    `sample.guidance_scale` = s classifier-free guidance (s = 1 + w of Ho & Salimans:
    s = 1 is the conditional model; see `guidance.classifier_free`).

    With `sample.guide_workdir` (`load_guide`), autoguidance at `sample.guidance_scale` instead of CFG
    (Karras et al. 2024, `guidance.autoguidance`): the model extrapolated away from that weaker one.

    With `sample.classifier_workdir` (see `load_classifier`), classifier guidance at scale
    `sample.classifier_scale` towards the same cycling labels (Dhariwal & Nichol 2021):
    Algorithm 1, the `cond_fn` mean shift, under the 'ddpm' sampler, and Algorithm 2,
    `guidance.classifier_guided` on the denoiser, under every other sampler. It composes
    with classifier-free guidance. A `training.objective='classify'` run draws no samples:
    its sample function raises a ConfigError. A VDM samples on the process of the γ of the parameters it is
    given (`setup.bind_process`), compiled again only when that γ changed.
    """
    if config.training.get("objective", "denoise") == "classify":
        return _no_samples
    if config.training.get("objective", "denoise") == "autoencode":
        return _reconstruction_fn(graphdef, config, sharding)
    learn_sigma = bool(config.model.get("learn_sigma"))
    sampler, options = sampler_from_config(config.sample, learn_sigma)
    output = network_output_fn(learn_sigma, options)
    batch_size = config.sample.batch_size  # divisible by the device count: validation.validate_config
    num_classes = config.model.get("num_classes")
    guidance_scale = config.sample.get("guidance_scale")
    text = config.model.get("text_encoder") is not None
    guide = load_guide(config, example_shape, sharding)
    if guidance_scale is not None and num_classes is None and not text and guide is None:
        raise ConfigError("sample.guidance_scale: classifier-free guidance needs a conditional model "
                          "(set model.num_classes or model.text_encoder), autoguidance a sample.guide_workdir")
    classifier = load_classifier(config, example_shape, sharding)
    if classifier is not None and num_classes is not None and classifier.num_classes != num_classes:
        raise ConfigError(
            f"sample.classifier_workdir: its classifier has {classifier.num_classes} classes; this model's "
            f"model.num_classes is {num_classes}"
        )
    label_classes = num_classes if classifier is None else classifier.num_classes
    channels = guided_channels(config, options, example_shape)
    labels = None if label_classes is None else jnp.asarray(sample_labels(batch_size, label_classes, batch_size))
    model_cond = labels if num_classes is not None else None  # what the diffusion model is given
    if text:
        tokens, token_mask = captions.vocabulary().encode(
            sample_prompts(config.sample.get("prompts"), batch_size), captions.max_caption_length()
        )
        model_cond = {"tokens": jnp.asarray(tokens), "token_mask": jnp.asarray(token_mask)} | (
            {} if model_cond is None else {"label": model_cond}
        )

    default_inputs = editing.sample_inputs(config, example_shape, batch_size)  # now: a bad image fails at build
    edits = editing.EditOptions.from_config(config, options)

    guide_output = None if guide is None else network_output_fn(bool(guide.config.model.get("learn_sigma")), {})

    def sample(
        schedule: Process, params: nnx.State, classifier_params: nnx.State | None, guide_params: nnx.State | None,
        key: jax.Array, inputs: dict[str, jax.Array],
    ) -> tuple[jax.Array, jax.Array]:
        noise_key, chain_key = jax.random.split(key)
        process = schedule  # with sample.t0, already cut there (`sample_fn`)
        if "init" in inputs:  # the edit noises the image itself: standard normal noise
            x_T = jax.random.normal(noise_key, (batch_size, *example_shape))
        else:
            x_T = sde.as_process(schedule).prior_sample(noise_key, (batch_size, *example_shape))  # EDM: N(0, σ_max² I)
        x_T = jax.lax.with_sharding_constraint(x_T, sharding)
        cond = editing.with_inputs(model_cond, inputs)  # super-resolution's and ControlNet's images

        def network(x_t: jax.Array, t: jax.Array, cond: conditioning.Cond) -> jax.Array:
            return output(model_apply(graphdef, params, x_t, t, cond))

        guide_fn = None
        if guide is not None:  # autoguidance: away from the weaker model, same conditioning

            def guide_fn(x_t: jax.Array, t: jax.Array) -> jax.Array:
                return guide_output(model_apply(guide.graphdef, guide_params, x_t, t, cond))

        model_fn = guidance.guided_model_fn(network, cond, guidance_scale, num_classes, channels, guide_fn)

        if edits.invert:  # DDIM inversion under the source labels, then sampling under the target ones
            source = editing.source_condition(cond, inputs)
            x_T = edits.invert_fn(lambda x_t, t: network(x_t, t, source), process, inputs["init"],
                                  config.diffusion.prediction)

        sampler_options = options
        if classifier is not None:

            def logits_fn(x_t: jax.Array, t: jax.Array) -> jax.Array:  # [B, K]
                return model_apply(classifier.graphdef, classifier_params, x_t, t)

            grad_fn = guidance.classifier_grad(logits_fn, labels, config.sample.classifier_scale)
            if config.sample.sampler == "ddpm":  # Algorithm 1: the ancestral mean shift
                sampler_options = {**options, "cond_fn": grad_fn}
            else:  # Algorithm 2: eps - sigma_t * grad on the denoiser
                model_fn = guidance.classifier_guided(model_fn, grad_fn, schedule, config.diffusion.prediction)

        model_fn, edit = edits.apply(model_fn, process, config.diffusion.prediction, inputs)
        if edit is not None:
            sampler_options = {**sampler_options, "edit": edit}
        x0, info = sampler(
            model_fn, process, chain_key, x_T, prediction=config.diffusion.prediction, return_info=True,
            **sampler_options,
        )
        return x0, info.nfe

    out_shardings = (sharding, NamedSharding(sharding.mesh, jax.sharding.PartitionSpec()))
    compiled = process_memo(lambda process: jax.jit(mesh_lib.with_mesh(functools.partial(sample, process),
                                                                        sharding.mesh), out_shardings=out_shardings))
    classifier_params = None if classifier is None else classifier.params
    guide_params = None if guide is None else guide.params
    bound: dict = {}  # a VDM's process, bound once per parameters (`generate` calls with the same ones per batch)

    def chain(params: nnx.State, inputs: dict[str, np.ndarray] | None) -> tuple[Callable, tuple]:
        """The jitted chain for `params` and its arguments."""
        if bound.get("params") is not params:
            # SDEdit's process is cut at sample.t0 here, outside the trace, once per parameters.
            bound.update(params=params, process=edits.process(bind_process(schedule, graphdef, params)))
        inputs = default_inputs if inputs is None else inputs
        return compiled(bound["process"]), (params, classifier_params, guide_params, inputs)

    def sample_fn(
        params: nnx.State, key: jax.Array, inputs: dict[str, np.ndarray] | None = None
    ) -> tuple[jax.Array, jax.Array]:
        fn, (params, classifier, guide, inputs) = chain(params, inputs)
        return fn(params, classifier, guide, key, inputs)

    def lower(params: nnx.State, key: jax.Array, inputs: dict[str, np.ndarray] | None = None) -> jax.stages.Lowered:
        """The jitted chain of `sample_fn(params, key, inputs)`, lowered (`.compile().as_text()`: its HLO)."""
        fn, (params, classifier, guide, inputs) = chain(params, inputs)
        return fn.lower(params, classifier, guide, key, inputs)

    sample_fn.lower = lower
    return sample_fn


def sample_labels(batch_size: int, num_classes: int, num_samples: int) -> np.ndarray:
    """The class labels that `generate` draws its samples for: 0, 1, 2, ... cycling within each batch."""
    return np.tile(np.arange(batch_size, dtype=np.int32) % num_classes, -(-num_samples // batch_size))[:num_samples]


def sample_prompts(prompts: tuple[str, ...] | None, batch_size: int) -> list[str]:
    """The captions a text-conditional model samples a batch for: `sample.prompts` cycled, or by default
    digits captions (`data.captions`) cycling the digit 0-9 and, each row of ten, one of thick, thin,
    leaning right, leaning left or nothing more, so a grid shows both what was asked and what was drawn."""
    if not prompts:
        levels = [(1, 0), (-1, 0), (0, 1), (0, -1), (0, 0)]
        prompts = [captions.caption(i % 10, levels[(i // 10) % len(levels)], 0) for i in range(batch_size)]
    return [prompts[i % len(prompts)] for i in range(batch_size)]


def generate(
    sample_fn: SampleFn, params: nnx.State, key: jax.Array, num_samples: int,
    inputs: dict[str, np.ndarray] | None = None, batch_size: int | None = None,
) -> tuple[np.ndarray, int]:
    """Calls `sample_fn` until `num_samples` samples exist: (float32 [N, ...] on the host, the most
    network evaluations a batch used; adaptive samplers differ between batches).

    `inputs` (`editing.sample_inputs`: images to edit, conditioning images), [M, ...] each, give batch b of
    `batch_size` (the sample function's) the rows b B, ..., (b + 1) B - 1 (cycling); None samples with the
    sample function's own. In a multi-process run every process must call it (each batch is all-gathered, a collective)
    and every process gets all N samples; only process 0 should write them. Batch b + 1 is dispatched before batch b
    is fetched, so the device never waits for the host between batches."""
    size = len(next(iter(inputs.values()))) if inputs else 0

    def dispatch(index: int) -> tuple[jax.Array, jax.Array]:
        batch_inputs = None
        if inputs:
            rows = np.arange(index * batch_size, (index + 1) * batch_size) % size
            batch_inputs = {k: v[rows] for k, v in inputs.items()}
        return sample_fn(params, jax.random.fold_in(key, index), batch_inputs)

    pending = dispatch(0)
    num_batches = -(-num_samples // pending[0].shape[0])  # an array's shape is known before its values
    batches, nfe = [], 0
    for index in range(num_batches):
        following = dispatch(index + 1) if index + 1 < num_batches else None
        x0, batch_nfe = distributed.fetch(pending)
        batches.append(np.asarray(x0))
        nfe = max(nfe, int(batch_nfe))
        pending = following
    return np.concatenate(batches)[:num_samples], nfe


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[-1, 1] floats -> uint8 [0, 255], rounding as the ADM evaluator's inputs are."""
    return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def image_grid(images: np.ndarray, pad: int = 1, cols: int | None = None) -> np.ndarray:
    """uint8 [N, H, W, C] -> one uint8 [rows*(H+pad)+pad, cols*(W+pad)+pad, C] picture (cols: ceil sqrt N)."""
    n, h, w, c = images.shape
    cols = math.ceil(math.sqrt(n)) if cols is None else cols
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, cols)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = image
    return grid


def scatter_image(points: np.ndarray, size: int = 384, extent: float = 2.5) -> np.ndarray:
    """A [size, size, 3] uint8 scatter plot of 2-D points over [-extent, extent]^2."""
    picture = np.full((size, size, 3), 255, np.uint8)
    picture[size // 2, :] = picture[:, size // 2] = 200  # axes
    pix = np.round((points[:, :2] / extent + 1.0) * 0.5 * (size - 1)).astype(int)
    keep = np.all((pix >= 0) & (pix < size), axis=1)
    picture[size - 1 - pix[keep, 1], pix[keep, 0]] = (31, 119, 180)
    return picture


def edit_panels(inputs: dict[str, np.ndarray], samples: np.ndarray, num: int = 8) -> np.ndarray:
    """uint8 [num * K, H, W, C]: for each of the first `num` examples, what it was made from, then the sample:
    input | mask | output for inpainting (unknown pixels grey in the input, known white in the mask), input |
    output for SDEdit / inversion, clean image | measurement | output for an inverse problem, the low-res image
    (nearest-upsampled) | output for super-resolution, the control image | output for ControlNet."""
    num = min(num, len(samples))
    shape = samples.shape[1:]  # [H, W, C]

    def image(x: np.ndarray) -> np.ndarray:  # [num, h, w, c] in [-1, 1] -> uint8 [num, H, W, C]
        x = nearest_upsample(x, shape[0] // x.shape[1])  # a low-res input at the sample's size
        return to_uint8(np.broadcast_to(x[..., :1] if x.shape[-1] != shape[-1] else x, (num, *shape)))

    columns = []
    if "known" in inputs:
        mask = inputs["mask"][:num]
        columns += [image(np.where(mask > 0, inputs["known"][:num], 0.0)), image(2.0 * mask - 1.0)]
    if "measurement" in inputs:  # an inverse problem: the clean image | what was measured of it (as an image)
        y = inputs["measurement"][:num]
        if "measurement_mask" in inputs:
            y = np.where(inputs["measurement_mask"][:num] > 0, y, 0.0)
        columns += [image(inputs["measured"][:num]), image(np.clip(y, -1.0, 1.0))]
    for name in ("init", "low_res", "control"):
        if name in inputs:
            columns.append(image(inputs[name][:num]))
    columns.append(to_uint8(samples[:num]))
    return np.stack(columns, axis=1).reshape(-1, *shape)


def save_samples(directory: str | Path, step: int, samples: np.ndarray, scale: int = 1) -> tuple[Path, Path]:
    """Writes samples_<step>.png (grid or scatter, upscaled `scale` times) and .npz."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    png, npz = directory / f"samples_{step}.png", directory / f"samples_{step}.npz"
    if samples.ndim == 4:
        images = to_uint8(samples)
        np.savez(npz, arr_0=images)
        grid = image_grid(images)
        picture = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
        if scale > 1:
            picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    else:
        np.savez(npz, arr_0=samples.astype(np.float32))
        picture = Image.fromarray(scatter_image(samples))
    picture.save(png)
    return png, npz


def save_edit_grid(directory: str | Path, step: int, inputs: dict[str, np.ndarray], samples: np.ndarray,
                   scale: int = 1) -> Path:
    """Writes edits_<step>.png: `edit_panels` as rows of input | (mask |) output, upscaled `scale` times."""
    panels = edit_panels(inputs, samples)
    grid = image_grid(panels, cols=len(panels) // min(8, len(samples)))
    picture = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    path = Path(directory) / f"edits_{step}.png"
    picture.save(path)
    return path
