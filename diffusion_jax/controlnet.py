"""ControlNet runs (Zhang, Rao & Agrawala 2023, arXiv 2302.05543): control images, the base, the score.

    # the base: ddpm_digits with v-prediction on the cosine schedule (about 6 minutes)
    python -m diffusion_jax.main --config=configs/ddpm_digits.py --workdir=runs/ddpm_v_digits \\
        --config.diffusion.prediction=v --config.diffusion.schedule=cosine
    python -m diffusion_jax.main --config=configs/controlnet_digits.py --workdir=runs/controlnet_digits
    # how well samples follow test-split controls, against the base's unsteered samples (chance)
    python -m diffusion_jax.controlnet --workdir=runs/controlnet_digits --num=256

A run with `model.name='controlnet_unet'` (`models.controlnet.ControlledUNet`) trains a copy of a trained
U-Net's encoder to steer the frozen U-Net (`controlnet.base_workdir`) towards a control image made from each
training image (`controlnet.control`; the paper's conditions are likewise computed from the images: Canny
edges, HED, depth, segmentation..., §4):

  'edges'  the thresholded Sobel gradient magnitude of the image (the paper's Canny model's role), with
           a random threshold per training example (the paper trains on Canny edges of random thresholds)
  'mask'   the digit's coarse mask: MASK_FACTOR x MASK_FACTOR cell means thresholded, upsampled back

Both are float {0, 1} [B, H, W, 1] (`conditioning`'s `control`). Training: `training_condition` (in the train
step) adds the batch's control to the condition; the loss is the diffusion loss of Eq. 5 (the base's own), and
only the copy learns (`training.optimizer`'s `frozen`). Sampling: `sample_inputs` gives the controls.
"""

import sys
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from flax import nnx

from diffusion_jax import conditioning
from diffusion_jax.errors import ConfigError
from diffusion_jax.super_resolution import area_downsample, nearest_upsample
from diffusion_jax.training import run_config
from diffusion_jax.training.setup import RunProcess, params_key, sampler_from_config

MODEL = "controlnet_unet"  # the `model.name` of a ControlNet run
CONTROLS = ("edges", "mask")
CONTROL_FIELDS = ("control_channels", "hint_channels")  # `model.*` of the copy, not of the base
MASK_FACTOR = 2  # 'mask': cells of 2x2 pixels (8x8 cells on 16x16 digits)
MASK_THRESHOLD = 0.3  # 'mask': a cell whose mean intensity in [0, 1] exceeds this is the digit
EDGE_THRESHOLD = 0.2  # 'edges': a pixel whose Sobel gradient magnitude (intensity [0, 1] per pixel) exceeds this
EDGE_JITTER = (0.5, 1.5)  # 'edges' in training: the threshold times U[0.5, 1.5), per example
FROZEN = ("base",)  # the parameter collections a ControlNet run does not train


def is_controlnet(config: ml_collections.ConfigDict) -> bool:
    return config.model.get("name") == MODEL


def frozen(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The top-level parameter collections the optimiser leaves as they are: ('base',) for a ControlNet run."""
    return FROZEN if is_controlnet(config) else ()


def _intensity(images: jax.Array) -> jax.Array:
    """[B, H, W, C] in [-1, 1] -> their mean over channels in [0, 1], [B, H, W, 1]."""
    return (jnp.mean(images, axis=-1, keepdims=True) + 1.0) / 2.0


def coarse_mask(images: jax.Array, threshold: float | jax.Array = MASK_THRESHOLD) -> jax.Array:
    """'mask': images [B, H, W, C] in [-1, 1] -> float {0, 1} [B, H, W, 1]: the mean intensity of each
    MASK_FACTOR x MASK_FACTOR cell above `threshold`, upsampled back by nearest neighbour."""
    u = _intensity(images)
    cells = area_downsample(u, u.shape[1] // MASK_FACTOR)  # [B, H/f, W/f, 1]
    return nearest_upsample((cells > threshold).astype(jnp.float32), MASK_FACTOR)


def sobel_edges(images: jax.Array, threshold: float | jax.Array = EDGE_THRESHOLD) -> jax.Array:
    """'edges': images [B, H, W, C] in [-1, 1] -> float {0, 1} [B, H, W, 1]: where the Sobel gradient magnitude
    of the intensity (normalised by the kernels' weight 4, so a step of 1 between neighbours reads 0.5;
    edge-padded) exceeds `threshold` (a scalar or per example [B, 1, 1, 1])."""
    u = jnp.pad(_intensity(images), ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")  # [B, H+2, W+2, 1]
    h, w = images.shape[1:3]

    def at(dy: int, dx: int) -> jax.Array:
        return u[:, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]

    gx = (at(-1, 1) + 2 * at(0, 1) + at(1, 1) - at(-1, -1) - 2 * at(0, -1) - at(1, -1)) / 4.0
    gy = (at(1, -1) + 2 * at(1, 0) + at(1, 1) - at(-1, -1) - 2 * at(-1, 0) - at(-1, 1)) / 4.0
    return (jnp.sqrt(gx**2 + gy**2) > threshold).astype(jnp.float32)


MAKERS: dict[str, Callable[..., jax.Array]] = {"edges": sobel_edges, "mask": coarse_mask}


def make_control(kind: str, images: jax.Array) -> jax.Array:
    """The control image of `kind` ('edges' | 'mask') of images [B, H, W, C] in [-1, 1]: float {0, 1}
    [B, H, W, 1], at the default threshold."""
    check_control(kind)
    return MAKERS[kind](images)


def check_control(kind: str) -> None:
    if kind not in CONTROLS:
        raise ConfigError(f"controlnet.control: unknown {kind!r}; choose one of: {', '.join(CONTROLS)}")


def training_condition(
    config: ml_collections.ConfigDict, cond: conditioning.Cond, images: jax.Array, key: jax.Array
) -> conditioning.Cond:
    """`cond` with the control image of the batch's `images` [B, H, W, C] as cond['control'] [B, H, W, 1] for a
    ControlNet run (`key` draws the 'edges' threshold per example, `EDGE_JITTER`); `cond` itself otherwise."""
    if not is_controlnet(config):
        return cond
    kind = config.controlnet.control
    if kind == "edges":
        scale = jax.random.uniform(key, (images.shape[0], 1, 1, 1), minval=EDGE_JITTER[0], maxval=EDGE_JITTER[1])
        control = sobel_edges(images, EDGE_THRESHOLD * scale)
    else:
        control = make_control(kind, images)
    return conditioning.as_dict(cond) | {"control": control}


def control_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
    """[H, W, C_c] of the control image a ControlNet run takes."""
    size = config.data.image_size
    return size, size, config.model.get("control_channels", 1)


def sample_inputs(config: ml_collections.ConfigDict, num: int) -> dict[str, np.ndarray]:
    """What a run samples `num` images with besides noise: {} unless a ControlNet run, else {'control': float32
    [num, H, W, C_c]}: `sample.control_image` (a .png, or an .npz whose arr_0 is uint8 [N, H, W, C_c], scaled to
    [0, 1] and cycled), or the `controlnet.control` images of the test split's first `num` digits. A control
    image of another size is a one-line ConfigError naming `sample.control_image` and the shape expected."""
    from diffusion_jax.data import example_shape  # the data pipeline, only when asked for
    from diffusion_jax.editing import load_images  # image files and the test split, read as editing reads them

    if not is_controlnet(config):
        return {}
    path = config.sample.get("control_image")
    if path is None:
        images, _ = load_images("test", "sample.control_image", num, example_shape(config.data), config.data)
        control = make_control(config.controlnet.control, jnp.asarray(images))
    else:
        images, _ = load_images(path, "sample.control_image", num, control_shape(config), config.data)
        control = (images + 1.0) / 2.0  # uint8 0..255 -> [0, 1]
    return {"control": np.asarray(control, np.float32)}


def check_config(config: ml_collections.ConfigDict) -> None:
    """One-line ConfigErrors for what a ControlNet run needs of the other fields (`validation` checks its own)."""
    if not is_controlnet(config):
        return
    if config.training.get("objective", "denoise") != "denoise":
        raise ConfigError(f"training.objective: {config.training.objective!r}; a ControlNet (model.name={MODEL!r}) "
                          "trains with the base's diffusion loss, 'denoise'")
    for field, value in (("model.pretrained", config.model.get("pretrained")),
                         ("latent.autoencoder_workdir", config.latent.get("autoencoder_workdir"))):
        if value is not None:
            raise ConfigError(f"{field}: {value!r}; a ControlNet starts from controlnet.base_workdir in pixel space: "
                              "leave it None")
    if config.data.image_size % MASK_FACTOR:
        raise ConfigError(f"data.image_size: {config.data.image_size}; the control images need a multiple of "
                          f"{MASK_FACTOR}")
    if config.model.get("control_channels", 1) != 1:
        raise ConfigError(f"model.control_channels: {config.model.control_channels}; the controlnet.control "
                          "images have 1 channel")


def _network_fields(model: ml_collections.ConfigDict) -> dict:
    """`model.*` as JSON less what is not the base U-Net's function (name, the copy's fields, dropout, weights)."""
    fields = run_config.as_json(model)
    for key in ("name", "dropout", "pretrained", *CONTROL_FIELDS):
        fields.pop(key, None)
    return fields


def load_base(config: ml_collections.ConfigDict, schedule: RunProcess, example_shape: tuple[int, ...]) -> nnx.State:
    """The parameters of `controlnet.base_workdir` (the EMA its `sample.ema_decay` names), checked to be this
    run's U-Net (`model.*` less the control fields) on this run's examples, process and schedule."""
    from diffusion_jax.objectives import load_diffusion_run  # objectives builds on training.setup, as this does

    field = "controlnet.base_workdir"
    workdir = config.controlnet.get("base_workdir")
    if workdir is None:
        raise ConfigError(f"{field}: None; model.name={MODEL!r} steers a trained diffusion U-Net: give its workdir")
    base = load_diffusion_run(workdir, field, example_shape)
    trained = base.config
    if trained.model.get("name") != "unet":
        raise ConfigError(f"{field}: {workdir} trained model.name={trained.model.get('name')!r}; a ControlNet "
                          "steers a 'unet'")
    changes = run_config.diff(_network_fields(trained.model), _network_fields(config.model))
    if changes:
        key, (had, has) = next(iter(changes.items()))
        raise ConfigError(f"{field}: {workdir}'s U-Net has model.{key}={had!r}; this config {has!r} (the copy and "
                          "the frozen base are that network)")
    for key in ("process", "prediction"):
        had, has = trained.diffusion.get(key, "discrete"), config.diffusion.get(key, "discrete")
        if had != has:
            raise ConfigError(f"{field}: {workdir} trained diffusion.{key}={had!r}; this config {has!r}")
    alpha = getattr(schedule, "alpha", None)
    if alpha is not None and not np.array_equal(np.asarray(base.schedule.alpha), np.asarray(alpha)):
        raise ConfigError(f"{field}: {workdir} was trained on another noise schedule ({trained.diffusion.schedule!r}, "
                          f"T={trained.diffusion.num_timesteps}); use its diffusion.schedule and num_timesteps")
    return base.params


def with_base(params: nnx.State, base: nnx.State) -> nnx.State:
    """A ControlledUNet's parameters `params` with the base U-Net's `base` as 'base' and copied into the
    trainable copy's encoder (the paper's initialisation, §3.2). The copy's conv_in reads [x, E(c)]: the base
    kernel fills its x slice and the E(c) slice stays zero; the hint encoder and the zero convolutions keep
    their initialisation."""
    pure = nnx.to_pure_dict(params)
    base_pure = nnx.to_pure_dict(base)
    pure["base"] = base_pure
    control = pure["control"]
    for name in set(control) & set(base_pure):  # cond, conv_in, down, mid_block1, mid_attn, mid_block2
        control[name] = jax.tree.map(lambda c, b: c.at[tuple(slice(0, n) for n in b.shape)].set(b), control[name],
                                     base_pure[name])
    nnx.replace_by_pure_dict(params, pure)
    return params


def initializer(
    config: ml_collections.ConfigDict, init_params: Callable[[jax.Array], nnx.State], schedule: RunProcess,
    example_shape: tuple[int, ...],
) -> Callable[[], nnx.State] | None:
    """For a ControlNet run, `read()` -> its step-0 parameters (`with_base` of the checked base, loaded now);
    None for any other run."""
    if not is_controlnet(config):
        return None
    base = load_base(config, schedule, example_shape)
    return lambda: with_base(init_params(params_key(config)), base)


def control_iou(kind: str, samples: np.ndarray, control: np.ndarray) -> np.ndarray:
    """How well samples follow their controls: per sample, the IoU of the control [N, H, W, 1] (> 0.5) with the
    `kind` control image of the sample [N, H, W, C] in [-1, 1] (1 where both are empty)."""
    made = np.asarray(make_control(kind, jnp.asarray(samples))) > 0.5
    given = np.asarray(control) > 0.5
    inter, union = (made & given).sum(axis=(1, 2, 3)), (made | given).sum(axis=(1, 2, 3))
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def score(workdir: str, num: int = 256, *, steps: int | None = None, seed: int = 0) -> dict[str, float]:
    """The mean `control_iou` of `num` samples of the ControlNet run in `workdir` (its `sample.*` sampler and
    EMA) for the test split's first `num` controls, and of its base's unsteered samples from the same noise
    against the same controls (chance)."""
    from diffusion_jax.loading import load  # loading builds on training; the train step imports this module

    run = load(workdir, field="--workdir")
    if not is_controlnet(run.config):
        raise ConfigError(f"--workdir: {workdir} trained model.name={run.config.model.get('name')!r}, not {MODEL!r}")
    base = load(run.config.controlnet.base_workdir, field="controlnet.base_workdir")
    sampler, options = sampler_from_config(run.config.sample)
    if steps is not None:
        options["steps"] = steps
    kind, prediction = run.config.controlnet.control, run.config.diffusion.prediction
    control = sample_inputs(run.config, num)["control"]

    @jax.jit
    def draw(params: nnx.State, base_params: nnx.State, x_T: jax.Array, c: jax.Array, key: jax.Array):
        steered = sampler(run._replace(params=params).model_fn({"control": c}), run.schedule, key, x_T,
                          prediction=prediction, **options)
        free = sampler(base._replace(params=base_params).model_fn(), base.schedule, key, x_T,
                       prediction=prediction, **options)
        return steered, free

    batch = run.config.sample.batch_size
    rows = -(-num // batch) * batch  # whole batches: one compile
    control = np.resize(control, (rows, *control.shape[1:]))
    steered, free = [], []
    for start in range(0, rows, batch):
        key = jax.random.fold_in(jax.random.key(seed), start)
        x_T = jax.random.normal(jax.random.fold_in(key, 1), (batch, *run.example_shape))
        s, f = draw(run.params, base.params, x_T, jnp.asarray(control[start : start + batch]), key)
        steered.append(np.asarray(s)), free.append(np.asarray(f))
        logging.info("control score: %d/%d", start + batch, rows)
    steered, free, control = np.concatenate(steered)[:num], np.concatenate(free)[:num], control[:num]
    return {"controlnet_iou": float(control_iou(kind, steered, control).mean()),
            "base_iou": float(control_iou(kind, free, control).mean()), "num": num, "step": run.step}


FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags; defined only when it runs, since the train step imports this module."""
    flags.DEFINE_string("workdir", None, "A ControlNet run (model.name='controlnet_unet').")
    flags.DEFINE_integer("num", 256, "Test-split controls to sample for.")
    flags.DEFINE_integer("steps", None, "Sampler steps (None: the run's sample.steps).")
    flags.DEFINE_integer("seed", 0, "Seed of the noise.")


def main(argv: list[str]) -> None:
    del argv
    try:
        if FLAGS.workdir is None:
            raise ConfigError("--workdir: required")
        result = score(str(Path(FLAGS.workdir)), FLAGS.num, steps=FLAGS.steps, seed=FLAGS.seed)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))


if __name__ == "__main__":
    define_flags()
    app.run(main)
