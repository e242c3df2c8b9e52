"""Type, range and divisibility checks of every config field, before anything is compiled.

`validate_config` walks a table of rules, one per field, and raises a one-line
`ConfigError` naming the dotted field, the bad value and what is allowed. Names
(model, sampler, schedule, ...) are checked where their registries live; fields the
table does not know are left alone.
"""

import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import ml_collections

from diffusion_jax.editing import INPAINT_METHODS
from diffusion_jax.errors import ConfigError

Check = Callable[[Any], bool]
_MISSING = object()


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _is_bool(v: Any) -> bool:
    return isinstance(v, bool)


def _int(low: int) -> Check:
    return lambda v: _is_int(v) and v >= low


def _real(low: float, high: float = math.inf, *, open_low: bool = False) -> Check:
    """A finite real in [low, high), or (low, high) with `open_low`."""
    return lambda v: _is_real(v) and (v > low if open_low else v >= low) and v < high


def _optional(check: Check) -> Check:
    return lambda v: v is None or check(v)


def _seq(check: Check, *, non_empty: bool = False) -> Check:
    return lambda v: isinstance(v, tuple | list) and (bool(v) or not non_empty) and all(map(check, v))


_UNIT = _real(0.0, 1.0)  # [0, 1)
_SIGMA_REL = _real(0.0, 0.2887, open_low=True)  # a power-function EMA's relative width (posthoc_ema)
_SIGMA_REL_ALLOWED = "a tuple of floats in (0, 0.2887) (power-function EMA widths σ_rel, EDM2)"


class Rule(NamedTuple):
    field: str  # dotted path from the config's root
    check: Check
    allowed: str
    optional: bool = False  # absent is fine (model arguments differ per model)


EVAL_METRICS = ("vlb_bpd", "ode_bpd", "fid", "inception_score", "kid", "digits", "psnr", "ssim")

RULES: tuple[Rule, ...] = (
    Rule("seed", _int(0), "an int >= 0"),
    Rule("data.image_size", _int(1), "a positive int"),
    Rule("data.data_dir", _optional(lambda v: isinstance(v, str)), "None or a path"),
    Rule("data.random_flip", _is_bool, "True or False"),
    Rule("model.ch", _int(1), "a positive int", optional=True),
    Rule("model.ch_mult", _seq(_int(1), non_empty=True), "a non-empty tuple of positive ints", optional=True),
    Rule("model.num_res_blocks", _int(1), "a positive int", optional=True),
    Rule("model.attn_resolutions", _seq(_int(1)), "a tuple of positive ints", optional=True),
    Rule("model.dropout", _UNIT, "a float in [0, 1)", optional=True),
    Rule("model.num_heads", _int(1), "a positive int", optional=True),
    Rule("model.num_head_channels", _optional(_int(1)), "None or a positive int", optional=True),
    Rule("model.use_scale_shift_norm", _is_bool, "True or False", optional=True),
    Rule("model.resblock_updown", _is_bool, "True or False", optional=True),
    Rule("model.num_classes", _optional(_int(1)), "None or a positive int", optional=True),
    Rule("model.learn_sigma", _is_bool, "True or False", optional=True),
    Rule("model.hidden", _int(1), "a positive int", optional=True),
    Rule("model.patch_size", _int(1), "a positive int", optional=True),
    Rule("model.hidden_size", _int(1), "a positive int", optional=True),
    Rule("model.mlp_ratio", _real(0.0, open_low=True), "a float > 0", optional=True),
    Rule("training.grad_accum_steps", _int(1), "an int >= 1 (microbatches per optimiser step)", optional=True),
    Rule("training.step_impl", lambda v: v in ("jit", "shard_map"), "'jit' or 'shard_map'", optional=True),
    Rule("training.shard_map_rng", lambda v: v in ("global", "per_device"), "'global' or 'per_device'",
         optional=True),
    Rule("mesh.sequence", lambda v: isinstance(v, int) and not isinstance(v, bool) and (v >= 1 or v == -1),
         "a positive int, or -1 for the devices left over", optional=True),
    Rule("training.peak_flops", _optional(_real(0.0)), "None (measure) or FLOP/s per device >= 0 (0: no MFU)",
         optional=True),
    Rule("training.compilation_cache_dir", _optional(lambda v: isinstance(v, str)), "None or a directory",
         optional=True),
    Rule("mesh.fsdp_min_size", _int(0), "an int >= 0 (parameters with fewer elements stay replicated)",
         optional=True),
    Rule("model.remat", _is_bool, "True or False", optional=True),
    Rule("model.dtype", lambda v: v in ("float32", "bfloat16", "float16"), "'float32', 'bfloat16' or 'float16'",
         optional=True),
    Rule("model.attention_impl", _optional(lambda v: v in ("xla", "cudnn")), "None, 'xla' or 'cudnn'", optional=True),
    Rule("model.depth", _int(1), "a positive int", optional=True),
    Rule("diffusion.num_timesteps", _int(1), "an int >= 1"),
    Rule("diffusion.min_snr_gamma", _real(0.0, open_low=True), "a float > 0"),
    Rule("diffusion.vlb_weight", _real(0.0, open_low=True), "a float > 0", optional=True),
    Rule("optim.learning_rate", _real(0.0, open_low=True), "a float > 0"),
    Rule("optim.warmup_steps", _int(0), "an int >= 0"),
    Rule("optim.grad_clip_norm", _real(0.0), "a float >= 0 (0: off)"),
    Rule("optim.b1", _UNIT, "a float in [0, 1)"),
    Rule("optim.b2", _UNIT, "a float in [0, 1)"),
    Rule("optim.eps", _real(0.0, open_low=True), "a float > 0"),
    Rule("optim.weight_decay", _real(0.0), "a float >= 0"),
    Rule("training.batch_size", _int(1), "a positive int"),
    Rule("training.num_steps", _int(1), "an int >= 1"),
    Rule("training.log_every", _int(0), "an int >= 0 (0: only at the last step)"),
    Rule("training.checkpoint_every", _int(0), "an int >= 0 (0: only at the last step)"),
    Rule("training.sample_every", _int(0), "an int >= 0 (0: only at the last step)"),
    Rule("training.keep_checkpoints", _optional(_int(1)), "None (keep all) or an int >= 1"),
    Rule("training.ema_decays", _seq(_UNIT), "a tuple of floats in [0, 1)"),
    Rule("training.ema_sigma_rels", _seq(_SIGMA_REL), _SIGMA_REL_ALLOWED, optional=True),
    Rule("training.ema_snapshot_every", _int(0), "an int >= 0 (0: no snapshots)", optional=True),
    Rule("training.on_nonfinite", lambda v: v in ("skip", "stop"), "'skip' or 'stop'", optional=True),
    Rule("training.on_checkpoint_error", lambda v: v in ("retry", "stop"), "'retry' or 'stop'", optional=True),
    Rule("training.lock_stale_after_s", _real(0.0, open_low=True), "a float > 0 (seconds)", optional=True),
    Rule("meanflow.interval_ratio", lambda v: _is_real(v) and 0.0 <= v <= 1.0, "a float in [0, 1]", optional=True),
    Rule("meanflow.adaptive_p", _real(0.0), "a float >= 0 (0: the plain squared error)", optional=True),
    Rule("meanflow.adaptive_c", _real(0.0, open_low=True), "a float > 0", optional=True),
    Rule("meanflow.time_scale", _real(0.0, open_low=True), "a float > 0 (10)", optional=True),
    Rule("repa.weight", _real(0.0), "a float >= 0 (0: off; the paper's 0.5)", optional=True),
    Rule("repa.encoder_path", _optional(lambda v: isinstance(v, str) and bool(v)),
         "None or the path of a DINOv2 model.safetensors (or its Hugging Face folder)", optional=True),
    Rule("repa.encoder_resolution", _int(1), "a positive int (DINOv2's input size: REPA's 224)", optional=True),
    Rule("autoencode.kl_weight", _real(0.0), "a float >= 0", optional=True),
    Rule("autoencode.disc_start", _int(0), "an int >= 0", optional=True),
    Rule("autoencode.disc_weight", _real(0.0), "a float >= 0", optional=True),
    Rule("autoencode.rec_kind", lambda v: v in ("l1", "l2"), "'l1' or 'l2'", optional=True),
    Rule("autoencode.pixel_reduction", lambda v: v in ("sum", "mean"), "'sum' or 'mean'", optional=True),
    Rule("training.label_dropout", _UNIT, "a float in [0, 1)", optional=True),
    Rule("sample.guidance_channels", _optional(_int(1)), "None (all) or an int >= 1", optional=True),
    Rule("sample.steps", _optional(_int(1)), "None (the sampler's default) or an int >= 1"),
    Rule("sample.num_samples", _int(1), "an int >= 1"),
    Rule("sample.batch_size", _int(1), "a positive int"),
    Rule("sample.ema_decay", _optional(_UNIT), "None (raw params) or a float in [0, 1)"),
    Rule("sample.ema_sigma_rel", _optional(_SIGMA_REL), f"None or {_SIGMA_REL_ALLOWED[2:]}", optional=True),
    Rule("sample.png_scale", _int(1), "an int >= 1"),
    Rule("sample.eta", _optional(_real(0.0)), "None or a float >= 0"),
    Rule("sample.clip_x0", _optional(_real(0.0, open_low=True)), "None (no clipping) or a float > 0"),
    Rule("sample.max_step_ratio", _optional(_real(1.0)), "None (no guard) or a float >= 1", optional=True),
    Rule("sample.snr", _optional(_real(0.0, open_low=True)), "None or a float > 0", optional=True),
    Rule("sample.n_corrector", _optional(_int(0)), "None or an int >= 0", optional=True),
    Rule("sample.n_steps_each", _optional(_int(1)), "None or an int >= 1", optional=True),
    Rule("sample.step_lr", _optional(_real(0.0, open_low=True)), "None or a float > 0", optional=True),
    Rule("sample.rtol", _optional(_real(0.0, open_low=True)), "None or a float > 0", optional=True),
    Rule("sample.atol", _optional(_real(0.0, open_low=True)), "None or a float > 0", optional=True),
    Rule("sample.max_steps", _optional(_int(1)), "None or an int >= 1", optional=True),
    Rule(
        "sample.classifier_workdir", _optional(lambda v: isinstance(v, str) and bool(v)),
        "None or the workdir of a training.objective='classify' run", optional=True,
    ),
    Rule("sample.classifier_scale", _real(0.0), "a float >= 0", optional=True),
    Rule("sample.guide_workdir", _optional(lambda v: isinstance(v, str) and bool(v)),
         "None or the workdir of a weaker run of the same data, process and prediction", optional=True),
    Rule("sample.guide_step", _optional(_int(1)), "None (the newest checkpoint) or a step >= 1", optional=True),
    Rule("controlnet.control", lambda v: v in ("edges", "mask"), "'edges' or 'mask'", optional=True),
    Rule("model.hint_channels", _int(1), "a positive int", optional=True),
    Rule("sample.control_image", _optional(lambda v: isinstance(v, str) and bool(v)),
         "None (the test split's controls) or a .png / .npz path", optional=True),
    Rule("model.low_res_size", _optional(_int(1)), "None or a positive int dividing data.image_size", optional=True),
    Rule("training.low_res_noise_max", _UNIT, "a float in [0, 1) (0: no augmentation)", optional=True),
    Rule("sample.low_res_noise", _UNIT, "a float in [0, 1) (0: the clean low-res image)", optional=True),
    Rule("sample.low_res_image", _optional(lambda v: isinstance(v, str) and bool(v)), "None or a .png or .npz path",
         optional=True),
    Rule("sample.low_res_workdir", _optional(lambda v: isinstance(v, str) and bool(v)),
         "None or the workdir of a stage-1 diffusion run", optional=True),
    Rule("sample.inpaint_method", lambda v: v in INPAINT_METHODS, f"one of: {', '.join(INPAINT_METHODS)}",
         optional=True),
    Rule("sample.repaint_jump", _int(1), "an int >= 1", optional=True),
    Rule("sample.repaint_resamples", _int(1), "an int >= 1 (1: plain replacement)", optional=True),
    Rule("sample.inpaint_cg_steps", _int(1), "an int >= 1", optional=True),
    Rule("sample.t0", _optional(lambda v: _is_real(v) and 0.0 < v <= 1.0),
         "None or SDEdit's start, a fraction of the process in (0, 1]", optional=True),
    Rule("sample.invert", _is_bool, "True or False", optional=True),
    Rule("sample.source_label", _optional(_int(0)), "None (the images' own labels) or a class index", optional=True),
    Rule("sample.low_res_consistency", _is_bool, "True or False", optional=True),
    Rule(
        "eval.metrics", _seq(lambda v: v in EVAL_METRICS), f"a tuple of: {', '.join(EVAL_METRICS)}", optional=True
    ),
    Rule("eval.every", _int(0), "an int >= 0 (0: only in --mode=eval)", optional=True),
    Rule("eval.checkpoint_step", _optional(_int(0)), "None (the newest) or a step", optional=True),
    Rule("eval.split", lambda v: isinstance(v, str) and bool(v), "a tfds split name", optional=True),
    Rule("eval.num_examples", _optional(_int(1)), "None (the whole split) or an int >= 1", optional=True),
    Rule("eval.batch_size", _int(1), "a positive int", optional=True),
    Rule("eval.seed", _int(0), "an int >= 0", optional=True),
    Rule("eval.clip_x0", _optional(_real(0.0, open_low=True)), "None or a float > 0", optional=True),
    Rule("eval.ode_num_probes", _int(1), "an int >= 1", optional=True),
    Rule("eval.ode_repeats", _int(1), "an int >= 1", optional=True),
    Rule("eval.ode_rtol", _real(0.0, open_low=True), "a float > 0", optional=True),
    Rule("eval.ode_atol", _real(0.0, open_low=True), "a float > 0", optional=True),
    Rule("eval.num_samples", _int(2), "an int >= 2", optional=True),
    Rule("eval.inception_weights", _optional(lambda v: isinstance(v, str) and bool(v)), "None or a path",
         optional=True),
    Rule("eval.inception_batch_size", _int(1), "a positive int", optional=True),
    Rule("eval.reference_stats", _optional(lambda v: isinstance(v, str) and bool(v)), "None or a path",
         optional=True),
    Rule("eval.kid_subsets", _int(1), "an int >= 1", optional=True),
    Rule("eval.kid_subset_size", _int(2), "an int >= 2", optional=True),
)


def _get(config: ml_collections.ConfigDict, field: str) -> Any:
    node = config
    for key in field.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or key not in node:
            return _MISSING
        node = node[key]
    return node


def _check_divisible(field: str, value: int, divisor: int, what: str) -> None:
    if value % divisor:
        below, above = value // divisor * divisor, (value // divisor + 1) * divisor
        nearest = f"{below} or {above}" if below else str(above)
        raise ConfigError(f"{field}: {value} is not divisible by {what}; use a multiple of {divisor}, e.g. {nearest}")


def validate_config(config: ml_collections.ConfigDict, num_devices: int, num_processes: int) -> None:
    """Checks every known field of `config` for type and range, and the batch sizes for divisibility.

    Args:
      config: an experiment config (see `diffusion_jax.config`).
      num_devices: the devices a batch is split over, over all processes: the mesh's data × fsdp
        (`jax.device_count()` without tensor parallelism).
      num_processes: `jax.process_count()`.

    Raises:
      ConfigError: naming the first bad field, its value and what is allowed.
    """
    for rule in RULES:
        value = _get(config, rule.field)
        if value is _MISSING:
            if rule.optional:
                continue
            raise ConfigError(f"{rule.field}: missing from the config; expected {rule.allowed}")
        if not rule.check(value):
            raise ConfigError(f"{rule.field}: got {value!r}; expected {rule.allowed}")
    what = f"the {num_devices} devices" + (f" and {num_processes} processes" if num_processes > 1 else "")
    accum = config.training.get("grad_accum_steps", 1)
    if accum > 1:
        what = f"training.grad_accum_steps={accum} microbatches of a multiple of {what}"
    _check_divisible(
        "training.batch_size", config.training.batch_size, math.lcm(num_devices, num_processes) * accum, what
    )
    _check_divisible("sample.batch_size", config.sample.batch_size, num_devices, f"the {num_devices} devices")
    if _get(config, "eval.batch_size") is not _MISSING:
        _check_divisible("eval.batch_size", config.eval.batch_size, num_devices, f"the {num_devices} devices")
    steps, num_timesteps = config.sample.steps, config.diffusion.num_timesteps
    if steps is not None and steps > num_timesteps:
        raise ConfigError(f"sample.steps: got {steps}; expected at most diffusion.num_timesteps={num_timesteps}")
    _check_objective(config)
    _check_power_emas(config)
    from diffusion_jax.controlnet import check_config  # a ControlNet run's own fields

    check_config(config)
    _check_super_resolution(config)


def _check_power_emas(config: ml_collections.ConfigDict) -> None:
    sigma_rels = tuple(config.training.get("ema_sigma_rels", ()))
    if len(set(sigma_rels)) != len(sigma_rels):
        raise ConfigError(f"training.ema_sigma_rels: got {sigma_rels}; expected distinct σ_rel values")
    if config.training.get("ema_snapshot_every", 0) and not sigma_rels:
        raise ConfigError("training.ema_snapshot_every: snapshots are of the power EMAs of training.ema_sigma_rels, "
                          "which is empty; set it (EDM2 tracks (0.05, 0.1)) or leave ema_snapshot_every 0")
    if _get(config, "eval.ema_sigma_rels") is not _MISSING and config.eval.ema_sigma_rels:
        if not _seq(_SIGMA_REL)(config.eval.ema_sigma_rels):
            raise ConfigError(f"eval.ema_sigma_rels: got {config.eval.ema_sigma_rels!r}; expected "
                              f"{_SIGMA_REL_ALLOWED} to sweep, or () for none")


def _check_objective(config: ml_collections.ConfigDict) -> None:
    """A noise-aware classifier ('classifier', logits) trains with 'classify'; every other model with 'denoise'."""
    from diffusion_jax.objectives import OBJECTIVES  # the table builds on the models; this module on nothing

    OBJECTIVES.get(_get(config, "training.objective") or "denoise")
    classify = _get(config, "training.objective") == "classify"
    name, num_classes = _get(config, "model.name"), _get(config, "model.num_classes")
    if classify and name != "classifier":
        raise ConfigError(
            "training.objective: 'classify' trains a noise-aware classifier; "
            f"set model.name='classifier' (got {name!r})"
        )
    if not classify and name == "classifier":
        raise ConfigError(
            "model.name: 'classifier' outputs class logits, not a denoiser; set training.objective='classify'"
        )
    autoencode = _get(config, "training.objective") == "autoencode"
    if autoencode != (name == "autoencoder_kl"):
        raise ConfigError(
            "training.objective: 'autoencode' trains LDM's first stage, model.name='autoencoder_kl' (got "
            f"objective {_get(config, 'training.objective')!r} with model.name={name!r})"
        )
    if classify and not (_is_int(num_classes) and num_classes >= 2):
        raise ConfigError(f"model.num_classes: got {num_classes!r}; training.objective='classify' needs an int >= 2")


def _check_super_resolution(config: ml_collections.ConfigDict) -> None:
    """A super-resolution model (`model.low_res_size`, SR3) is a U-Net whose input divides the image size; it is
    conditioned on a given low-res image or on a stage-1 run's samples, not both."""
    size = _get(config, "model.low_res_size")
    if size is None or size is _MISSING:
        return
    image_size, name = config.data.image_size, _get(config, "model.name")
    if name != "unet":
        raise ConfigError(f"model.low_res_size: set on model.name={name!r}; only the 'unet' is built as a "
                          "super-resolution model")
    if not (size < image_size and image_size % size == 0):
        raise ConfigError(f"model.low_res_size: got {size}; a super-resolution model's input must be smaller than "
                          f"data.image_size={image_size} and divide it, e.g. {image_size // 2}")
    if _get(config, "sample.low_res_image") not in (None, _MISSING) and _get(
            config, "sample.low_res_workdir") not in (None, _MISSING):
        raise ConfigError("sample.low_res_image: set together with sample.low_res_workdir; condition on a given "
                          "image or on the stage-1 run's samples, not both")
