"""Editing with a trained model: inpainting (score_sde's imputation, RePaint, the exact conditional denoiser),
SDEdit and DDIM-inversion editing, each an edit of the reverse chain every `run_chain` sampler takes.

- `Edit` is the `samplers.chain.ChainEdit` of all of them: an optional start image (SDEdit: the chain starts at
  its top level from the noised image), optional known pixels (imputation: after every step the known part of
  the state is replaced by the known image noised to where the step landed; Song et al. 2021, arXiv 2011.13456,
  App. I.2), and RePaint's resampling (Lugmayr et al. 2022, arXiv 2201.09865, Algorithm 1 with the jumps of
  their §4.2: after every `jump` steps the chain goes back up `jump` levels through the forward process,
  `resamples - 1` times, so the unknown part is harmonised with the known one).
- `truncate(process, t0)` is SDEdit's start time (Meng et al. 2021, arXiv 2108.01073, Algorithm 1): the process
  cut at t0 in (0, 1] of its time range, so any sampler's `steps` levels discretise [0, t0].
- `inpaint.conditional_denoiser` is the third inpainting method, a denoiser transform (exact for Gaussian data).

`sample_inputs` makes the per-example arrays sample mode feeds these from `config.sample`: the images to edit
(`sample.inpaint_image`, `sample.init_image`: 'test' or an image file), the mask (`sample.inpaint_mask`: an image
file or the generators 'box' | 'half' | 'strokes'), and the conditioning images of super-resolution and
ControlNet models.
"""

import dataclasses
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from diffusion_jax import conditioning, diffusion, inpaint, inverse
from diffusion_jax.errors import ConfigError
from diffusion_jax.samplers.chain import Landing, StepFn
from diffusion_jax.samplers.ddim import ddim_invert
from diffusion_jax.samplers.levels import NoiseLevels, NoiseProcess, f32
from diffusion_jax.schedules import Schedule

INPAINT_METHODS = ("replace", "repaint", "conditional")
MASKS = ("box", "half", "strokes")


class Edit(NamedTuple):
    """A `ChainEdit`: SDEdit's start image and/or inpainting's known pixels, with RePaint's resampling.

    init: [B, ...] the image the chain starts from (at the sampler's top level: alpha x_init + sigma z, where z
        is the sampler's x_T, which must then be standard normal), or None (start from x_T).
    known, mask: [B, ...] the known image and 1 where it is known (0 elsewhere), or None.
    jump, resamples: RePaint's jump length j and resamplings r (r = 1: plain imputation).
    """

    init: jax.Array | None = None
    known: jax.Array | None = None
    mask: jax.Array | None = None
    jump: int = 1
    resamples: int = 1

    def order(self, num_steps: int) -> np.ndarray:
        if self.known is None or self.resamples <= 1:
            return np.arange(num_steps - 1, -1, -1, dtype=np.int32)
        return repaint_order(num_steps, self.jump, self.resamples)

    def start(self, x_T: jax.Array, levels: NoiseLevels) -> jax.Array:
        if self.init is None:
            return x_T
        top = levels.num - 1
        return float(levels.alpha[top]) * self.init.astype(x_T.dtype) + float(levels.sigma[top]) * x_T

    def wrap(self, step: StepFn, levels: NoiseLevels, landing: Landing) -> StepFn:
        if self.known is None:
            return step
        alpha_to, sigma_to = f32(landing.alpha), f32(landing.sigma)
        alpha_up = f32(levels.alpha / landing.alpha)  # undoing step i: landing -> level i (`levels.transition`)
        sigma_up = f32(np.sqrt(np.maximum(levels.sigma**2 - (levels.alpha / landing.alpha) ** 2 * landing.sigma**2,
                                          0.0)))
        known, mask = self.known, self.mask

        def replaced(x: jax.Array, state: object, i: jax.Array, key: jax.Array) -> tuple[jax.Array, object]:
            x_prev, state = step(x, state, i, key)
            m = jnp.broadcast_to(mask, x_prev.shape).astype(x_prev.dtype)
            z = jax.random.normal(jax.random.fold_in(key, 1), x_prev.shape, x_prev.dtype)
            y = alpha_to[i] * known.astype(x_prev.dtype) + sigma_to[i] * z  # known image at the landing level
            return m * y + (1.0 - m) * x_prev, state

        if self.resamples <= 1:
            return replaced

        def undo(x: jax.Array, state: object, i: jax.Array, key: jax.Array) -> tuple[jax.Array, object]:
            z = jax.random.normal(key, x.shape, x.dtype)
            return alpha_up[i] * x + sigma_up[i] * z, state

        def operation(x: jax.Array, state: object, op: jax.Array, key: jax.Array) -> tuple[jax.Array, object]:
            i = jnp.where(op >= 0, op, -op - 1)
            return jax.lax.cond(op >= 0, replaced, undo, x, state, i, key)

        return operation


@dataclasses.dataclass(frozen=True)
class EditOptions:
    """What `config.sample` asks sample mode to edit with (checked once, used inside the jitted sample function).

    t0: SDEdit's start (None: the whole process); invert: DDIM-invert the init image instead of noising it;
    method: 'replace' | 'repaint' | 'conditional' (inpainting); jump, resamples: RePaint's; cg_steps: the
    conditional denoiser's; steps, spacing: the DDIM inversion's levels (the sampler's own, so that a 'ddim'
    sampler starts where the inversion ends); low_res_consistency: project a super-resolution model's x̂_0 onto
    its low-res input (`super_resolution.consistent_denoiser`).
    """

    t0: float | None = None
    invert: bool = False
    method: str = "replace"
    jump: int = 10
    resamples: int = 10
    cg_steps: int = 8
    steps: int = 50
    spacing: str = "uniform"
    low_res_consistency: bool = False
    inverse: ml_collections.ConfigDict | None = None  # `config.inverse` when it sets an operator

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, options: dict) -> "EditOptions":
        sample = config.sample
        settings = config.get("inverse")
        settings = None if settings is None or settings.get("operator") is None else settings
        method = sample.get("inpaint_method") or "replace"
        if method not in INPAINT_METHODS:
            raise ConfigError(f"sample.inpaint_method: unknown method {method!r}; choose one of: "
                              f"{', '.join(INPAINT_METHODS)}")
        t0 = sample.get("t0")
        if t0 is not None:
            truncate_check(t0)
        init = sample.get("init_image") is not None
        if (t0 is not None or sample.get("invert")) and not init:
            field = "sample.t0" if t0 is not None else "sample.invert"
            raise ConfigError(f"{field}: SDEdit and DDIM inversion edit an image; set sample.init_image")
        edits_chain = init or (sample.get("inpaint_image") is not None and method != "conditional")
        if edits_chain and sample.sampler in ("ode", "meanflow"):
            kind = "an adaptive solver" if sample.sampler == "ode" else "jumps of the average velocity"
            raise ConfigError(f"sample.sampler: {sample.sampler!r} ({kind}) takes no chain edits; SDEdit, DDIM "
                              "inversion and 'replace'/'repaint' inpainting need a stepping sampler (e.g. 'ddim')")
        if sample.get("repaint_jump", 10) < 1 or sample.get("repaint_resamples", 10) < 1:
            raise ConfigError(f"sample.repaint_jump, sample.repaint_resamples: got {sample.repaint_jump}, "
                              f"{sample.repaint_resamples}; both must be >= 1")
        consistency = bool(sample.get("low_res_consistency"))
        if consistency and sample.get("low_res_noise"):
            raise ConfigError(f"sample.low_res_consistency: projects onto the clean low-res image; got "
                              f"sample.low_res_noise={sample.low_res_noise}, set it to 0")
        return cls(
            t0=t0, invert=bool(sample.get("invert")), method=method, jump=sample.get("repaint_jump", 10),
            resamples=sample.get("repaint_resamples", 10), cg_steps=sample.get("inpaint_cg_steps", 8),
            steps=options.get("steps", 50), spacing=options.get("spacing") or "uniform",
            low_res_consistency=consistency, inverse=settings,
        )

    def process(self, process: NoiseProcess) -> NoiseProcess:
        """The process the sampler runs on: cut at t0 for SDEdit."""
        return process if self.t0 is None else truncate(process, self.t0)

    def invert_fn(
        self, model_fn: diffusion.ModelFn, process: NoiseProcess, init: jax.Array, prediction: str
    ) -> jax.Array:
        """x_T [B, ...] at the top of the sampler's levels from which deterministic DDIM regenerates `init`
        (`samplers.ddim_invert` with the sampler's steps and spacing)."""
        return ddim_invert(model_fn, process, init, self.steps, prediction, spacing=self.spacing)

    def apply(
        self, model_fn: diffusion.ModelFn, process: NoiseProcess, prediction: str, inputs: dict[str, jax.Array]
    ) -> tuple[diffusion.ModelFn, Edit | None]:
        """The denoiser and the chain edit for a batch's `inputs` (`sample_inputs`): an inverse problem's posterior
        denoiser (`inverse.posterior_denoiser`), the conditional denoiser for inpainting by 'conditional',
        super-resolution's low-res-consistent denoiser with `low_res_consistency`, an `Edit` for SDEdit and
        'replace' / 'repaint' (None when nothing edits the chain)."""
        if self.low_res_consistency and "low_res" in inputs:
            from diffusion_jax.super_resolution import consistent_denoiser  # it imports this module

            model_fn = consistent_denoiser(model_fn, process, prediction, inputs["low_res"])
        if self.inverse is not None and "measurement" in inputs:
            s = self.inverse
            operator = inverse.from_config(s, inputs.get("measurement_mask"))
            model_fn = inverse.posterior_denoiser(model_fn, process, prediction, operator, inputs["measurement"],
                                                  s.noise_std, s.method, s.scale, s.cg_steps)
        known, mask = inputs.get("known"), inputs.get("mask")
        if known is not None and self.method == "conditional":
            model_fn = inpaint.conditional_denoiser(model_fn, process, prediction, known, mask, self.cg_steps)
            known = mask = None
        init = None if self.invert else inputs.get("init")
        if init is None and known is None:
            return model_fn, None
        resamples = self.resamples if self.method == "repaint" else 1
        return model_fn, Edit(init=init, known=known, mask=mask, jump=self.jump, resamples=resamples)


def with_inputs(cond: conditioning.Cond, inputs: dict[str, jax.Array]) -> conditioning.Cond:
    """`cond` with the condition entries of `inputs` (super-resolution's low-res image, ControlNet's control)."""
    entries = {k: v for k, v in inputs.items() if k in conditioning.KEYS}
    return cond if not entries else conditioning.as_dict(cond) | entries


def source_condition(cond: conditioning.Cond, inputs: dict[str, jax.Array]) -> conditioning.Cond:
    """The condition a DDIM inversion runs under: `cond` with its labels replaced by `inputs['source_label']`
    (the edited images' own), when both exist."""
    source = inputs.get("source_label")
    if source is None or cond is None:
        return cond
    if not isinstance(cond, dict):
        return source
    return cond | {"label": source} if "label" in cond else cond


def repaint_order(num_steps: int, jump: int, resamples: int) -> np.ndarray:
    """RePaint's schedule of reverse steps and jumps (Lugmayr et al. 2022, §4.2): down one level at a time;
    on landing at every `jump`-th level (from the clean end, t = 0, j, 2j, ... < N - j, their time index t =
    level + 1) go back up `jump` levels, `resamples - 1` times each. Operations as `ChainEdit.order`: i for
    reverse step i, -(i + 1) for undoing it: N + J (r - 1) j reverse steps for the J jump points, e.g. N = 4,
    j = 2, r = 2: 3 2 1 0 -1 -2 1 0 (6 network evaluations for a one-evaluation step)."""
    jumps = {t: resamples - 1 for t in range(0, num_steps - jump, jump)}
    t, ops = num_steps, []
    while t >= 1:
        t -= 1
        ops.append(t)  # reverse step t: from level t (time t + 1) to time t
        if jumps.get(t, 0) > 0:
            jumps[t] -= 1
            for _ in range(jump):
                ops.append(-(t + 1))  # undo step t: back up from time t to time t + 1
                t += 1
    return np.asarray(ops, np.int32)


def truncate(process: NoiseProcess, t0: float) -> NoiseProcess:
    """`process` cut at t0 of its time range (SDEdit's t0, Meng et al. 2021, Algorithm 1): a discrete schedule's
    first round(t0 T) timesteps (at least 1), or a continuous process with t_max = t_min + t0 (t_max - t_min)
    (for EDM, sigma_max likewise). t0 = 1 is the process itself; t0 outside (0, 1] is a ConfigError."""
    truncate_check(t0)
    if t0 == 1.0:
        return process
    if isinstance(process, Schedule):
        kept = max(1, round(t0 * process.num_timesteps))
        return jax.tree.map(lambda a: a[:kept], process)
    names = {f.name for f in dataclasses.fields(process)} if dataclasses.is_dataclass(process) else set()
    end = "t_max" if "t_max" in names else "sigma_max" if "sigma_max" in names else None
    if end is None:
        raise ConfigError(f"sample.t0: cannot start a {type(process).__name__} midway; use t0 = 1")
    top = process.t_min + t0 * (process.t_max - process.t_min)
    return dataclasses.replace(process, **{end: top})


def truncate_check(t0: float) -> None:
    """A ConfigError naming sample.t0 unless 0 < t0 <= 1."""
    if not isinstance(t0, (int, float)) or not 0.0 < t0 <= 1.0:
        raise ConfigError(f"sample.t0: got {t0}; SDEdit's start time is a fraction of the process in (0, 1]")


def make_mask(spec: str, shape: tuple[int, ...], num: int, seed: int = 0) -> np.ndarray:
    """float32 [num, *shape] masks, 1 where the pixel is known, from `sample.inpaint_mask`:

    'box'      the centre square of half the side unknown;
    'half'     the right half unknown;
    'strokes'  3 random strokes of width ~H/8 unknown, different per example (numpy `seed`, example index);
    a path     an image file (.png, or .npz `arr_0` [H, W] / [N, H, W(, C)]): known where it is > half its range.
    """
    h, w = shape[0], shape[1]
    if spec == "box":
        mask = np.ones((h, w), np.float32)
        mask[h // 4 : h - h // 4, w // 4 : w - w // 4] = 0.0
        masks = np.broadcast_to(mask, (num, h, w))
    elif spec == "half":
        mask = np.ones((h, w), np.float32)
        mask[:, w // 2 :] = 0.0
        masks = np.broadcast_to(mask, (num, h, w))
    elif spec == "strokes":
        masks = np.stack([_strokes(h, w, np.random.default_rng([seed, n])) for n in range(num)])
    else:
        raw = _read_array(spec, "sample.inpaint_mask", allowed=f"one of {MASKS} or an image file")
        raw = raw.astype(np.float32)
        known = raw > 0.5 * (raw.max() if raw.max() > 1 else 1.0)
        if known.ndim == 3 and known.shape[-1] in (1, 3, 4) and known.shape[:2] == (h, w):
            known = known[..., 0]
        if known.shape[-2:] != (h, w):
            raise ConfigError(
                f"sample.inpaint_mask: {spec} is {known.shape}; this model makes {h}x{w} images, so the mask must be "
                f"[{h}, {w}] (or [N, {h}, {w}])"
            )
        masks = known.reshape(-1, h, w).astype(np.float32)
        masks = masks[np.arange(num) % len(masks)]
    return np.broadcast_to(masks[..., None], (num, *shape)).astype(np.float32)


def _strokes(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """[h, w] float32 mask with 3 random thick line segments set to 0 (unknown)."""
    mask = np.ones((h, w), np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    width = max(1.0, h / 8)
    for _ in range(3):
        (y0, x0), (y1, x1) = rng.uniform(0, [h, w], size=(2, 2))
        d = np.array([y1 - y0, x1 - x0])
        u = np.clip(((yy - y0) * d[0] + (xx - x0) * d[1]) / max(d @ d, 1e-9), 0.0, 1.0)
        dist = np.hypot(yy - (y0 + u * d[0]), xx - (x0 + u * d[1]))
        mask[dist <= width / 2] = 0.0
    return mask


def _read_array(path: str, field: str, allowed: str) -> np.ndarray:
    """The pixels of an image file: .png/.jpg via PIL, .npz via its `arr_0` (numpy only, no pickles)."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{field}: {path!r} is neither {allowed} nor an existing file")
    if file.suffix == ".npz":
        with np.load(file, allow_pickle=False) as data:
            return np.asarray(data["arr_0"])
    with Image.open(file) as picture:
        return np.asarray(picture)


def load_images(
    spec: str, field: str, num: int, example_shape: tuple[int, ...], data: ml_collections.ConfigDict
) -> tuple[np.ndarray, np.ndarray | None]:
    """float32 [num, *example_shape] images in [-1, 1] and their labels (None for a file) from `spec`:
    'test', the test split's first images (cycled); or an image file (.png: one image, used for every example;
    .npz: `arr_0` uint8 [N, H, W, C] as `samples_*.npz`, cycled). A shape other than the model's is a ConfigError
    naming `field`."""
    if spec == "test":
        from diffusion_jax.data import load_split  # the data pipeline, only when asked for

        images, labels = load_split(data, "test")
        rows = np.arange(num) % len(images)
        return images[rows].astype(np.float32) / 127.5 - 1.0, np.asarray(labels)[rows].astype(np.int32)
    raw = _read_array(spec, field, allowed="'test'")
    h, w, c = example_shape
    if raw.ndim == 2 or (raw.ndim == 3 and raw.shape[-1] in (3, 4) and raw.shape[:2] == (h, w)):
        raw = raw[None]  # one image
    if raw.ndim == 3:
        raw = raw[..., None]
    if raw.shape[-1] != c and c == 1 and raw.shape[-1] in (3, 4):
        raw = raw[..., :3].mean(-1, keepdims=True)  # greyscale for a one-channel model
    if raw.shape[1:] != (h, w, c):
        raise ConfigError(f"{field}: {spec} holds images of {raw.shape[1:]}; this model makes {(h, w, c)}")
    images = raw.astype(np.float32) / 127.5 - 1.0
    return images[np.arange(num) % len(images)], None


def measurement_inputs(config: ml_collections.ConfigDict, example_shape: tuple[int, ...], num: int
                       ) -> dict[str, np.ndarray]:
    """An inverse problem's arrays (`config.inverse`; empty when `inverse.operator` is None): 'measured' [num, ...],
    the clean images, 'measurement' y = A x + σ_y n (numpy noise of `config.seed`), and for the 'mask' operator
    'measurement_mask'."""
    settings = config.get("inverse")
    if settings is None or settings.get("operator") is None:
        return {}
    inverse.check_config(settings, example_shape)
    images, _ = load_images(settings.image, "inverse.image", num, example_shape, config.data)
    inputs = {"measured": images}
    masks = None
    if settings.operator == "mask":
        masks = inputs["measurement_mask"] = make_mask(settings.mask, example_shape, num, seed=config.seed)
    clean = np.asarray(inverse.from_config(settings, masks).apply(jnp.asarray(images)))
    noise = np.random.default_rng([config.seed, 7]).standard_normal(clean.shape).astype(np.float32)
    inputs["measurement"] = clean + np.float32(settings.noise_std) * noise
    return inputs


def sample_inputs(
    config: ml_collections.ConfigDict, example_shape: tuple[int, ...], num: int, key: jax.Array | None = None
) -> dict[str, np.ndarray]:
    """The per-example arrays [num, ...] sample mode edits or conditions with, from `config.sample`:
    'known' and 'mask' (inpainting), 'init' and 'source_label' (SDEdit / DDIM inversion), and the condition
    entries of super-resolution ('low_res', 'low_res_noise') and ControlNet ('control') models. Empty for a
    plain run. With a `key`, a cascade's low-res images are drawn from `sample.low_res_workdir`'s model."""
    from diffusion_jax import controlnet, super_resolution  # their conditioning images (they import this module)

    sample = config.sample
    inputs: dict[str, np.ndarray] = {}
    if sample.get("inpaint_image") is not None or sample.get("inpaint_mask") is not None:
        if sample.get("inpaint_image") is None or sample.get("inpaint_mask") is None:
            missing = "sample.inpaint_mask" if sample.get("inpaint_mask") is None else "sample.inpaint_image"
            raise ConfigError(f"{missing}: inpainting needs both sample.inpaint_image and sample.inpaint_mask")
        inputs["known"], labels = load_images(sample.inpaint_image, "sample.inpaint_image", num, example_shape,
                                              config.data)
        inputs["mask"] = make_mask(sample.inpaint_mask, example_shape, num, seed=config.seed)
    if sample.get("init_image") is not None:
        inputs["init"], labels = load_images(sample.init_image, "sample.init_image", num, example_shape, config.data)
        if sample.get("source_label") is not None:
            inputs["source_label"] = np.full((num,), sample.source_label, np.int32)
        elif labels is not None:
            inputs["source_label"] = labels
    inputs |= measurement_inputs(config, example_shape, num)
    low_res = (super_resolution.sample_inputs(config, num) if key is None
               else super_resolution.cascade_inputs(config, num, key))
    return inputs | low_res | controlnet.sample_inputs(config, num)
