"""Importing the community's PyTorch / diffusers checkpoints into our Flax models, bit-faithfully.

    python -m diffusion_jax.convert --from=PATH --model=ddpm_cifar10 --out=WORKDIR

writes an orbax checkpoint (step 0, the weights as the parameters and every EMA) and config.json in
WORKDIR, which sample and eval mode read and training resumes from; or set `model.pretrained=PATH` in any
config, and training starts from those weights (sample/eval modes run them when the workdir has no
checkpoint yet).

PATH is a `.safetensors` file, a diffusers model folder (`config.json` + `diffusion_pytorch_model.*`) or
a PyTorch `.pt/.pth/.bin` (read with `torch.load(weights_only=True)` only; `convert.source`). Which
mapping applies follows `model.name` (`FORMATS`): each format module holds the declarative name/layout
rules (`convert.mapping.Rule`) and, for a diffusers folder, reads our model's fields from its config.json,
where a value that contradicts this config is a one-line error naming both.

  model.name        checkpoint                                   module
  'unet'            diffusers UNet2DModel (DDPM)                 `convert.unet2d`
                    or UNet2DConditionModel (SD 1.x)             `convert.unet2d_condition`
  'autoencoder_kl'  diffusers AutoencoderKL (SD's VAE), into     `convert.autoencoder_kl`
                    `autoencoder/` (the discriminator: initialised)
  'dit', 'DiT-*/*'  DiT's reference .pt, DiTTransformer2DModel   `convert.dit`

A format module may also name `TARGET`, the subtree of our parameters its rules fill (the rest is drawn by
the initialiser with a new run's key, `initialised_around`), `source_options(names)`, rule options read
from the checkpoint's tensor names, `config_from_tensors(source)`, our model fields read off the tensors'
shapes where there is no config.json, `check_source(source)`, checks that read tensors no rule places (run
before the weights are), and `model_defaults(model_name)`, the fields a config may leave to the model.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from pathlib import Path

import jax
import ml_collections
from absl import logging
from flax import nnx

from diffusion_jax.convert import autoencoder_kl, dit, mapping, source, unet2d, unet2d_condition
from diffusion_jax.errors import ConfigError

# model.name -> its format module
FORMATS: dict[str, types.ModuleType] = {"unet": unet2d, "autoencoder_kl": autoencoder_kl, "dit": dit}
FORMATS |= dict.fromkeys(dit.VARIANTS, dit)  # 'DiT-S/2' ... 'DiT-XL/8'


def _unet_format(tensors: source.TensorSource) -> types.ModuleType:
    """A 'unet' checkpoint's format: SD's UNet2DConditionModel (by its config.json's `_class_name`, or without
    one by its cross-attention tensors), else DDPM's UNet2DModel."""
    return unet2d_condition if unet2d_condition.is_conditional(tensors.config, tensors.names) else unet2d


# model.name whose checkpoints come in several formats -> the format of a given source (else `FORMATS`')
SOURCE_FORMATS: dict[str, Callable[[source.TensorSource], types.ModuleType]] = {"unet": _unet_format}

# our model fields a checkpoint's config.json decides, and where the data's shape lives for the rest
DATA_FIELDS = {"image_size": "data.image_size", "in_channels": "the data's channels"}


def format_of(config: ml_collections.ConfigDict, tensors: source.TensorSource | None = None) -> types.ModuleType:
    """The format module that imports `tensors` (when given: `SOURCE_FORMATS`) into `model.name`."""
    name = config.model.name
    if name not in FORMATS:
        raise ConfigError(f"model.pretrained: no importer for model.name={name!r}; there are: {', '.join(FORMATS)}")
    return SOURCE_FORMATS[name](tensors) if name in SOURCE_FORMATS and tensors is not None else FORMATS[name]


def check_against(
    config: ml_collections.ConfigDict, derived: dict, example_shape: tuple[int, ...],
    fmt: types.ModuleType | None = None, evidence: str = "config.json",
) -> None:
    """A one-line ConfigError where the checkpoint's `evidence` (its config.json, or its tensors' shapes), read as
    our fields `derived` by the format `fmt` (by default `model.name`'s), contradicts `config`."""
    have = {"image_size": example_shape[0], "in_channels": example_shape[-1]}
    defaults = getattr(fmt or format_of(config), "model_defaults", lambda name: {})(config.model.name)
    for field, value in derived.items():
        if field in DATA_FIELDS:
            mine, where = have[field], DATA_FIELDS[field]
        else:
            mine, where = config.model.get(field, defaults.get(field)), f"model.{field}"
        mine = tuple(mine) if isinstance(mine, list | tuple) else mine
        if mine != value and not (field == "num_heads" and derived.get("num_head_channels") is not None):
            raise ConfigError(f"{where}: {mine!r} in this config, but model.pretrained's {evidence} makes it "
                              f"{value!r}; set it so, or use a checkpoint of this model")


Init = Callable[[jax.Array], nnx.State]  # the model's initialiser: key -> params (`training.setup.build_model`)


def importer(
    config: ml_collections.ConfigDict, init_params: Init, example_shape: tuple[int, ...],
    path: str | Path | None = None,
) -> Callable[[], nnx.State]:
    """Checks `model.pretrained` (or `path`) against this config's model (`init_params`' parameters) now, from its
    config.json, tensor names and shapes, without reading a weight; the returned function reads them. Only
    discrete-time networks are imported (the checkpoints are DDPM-style ε/v networks), and first stages."""
    path = path or config.model.get("pretrained")
    abstract_params = jax.eval_shape(init_params, jax.random.key(0))
    diffusion = config.training.get("objective") != "autoencode"  # a first stage runs no diffusion process
    if diffusion and config.diffusion.get("process", "discrete") != "discrete":
        raise ConfigError(f"model.pretrained: imports a discrete-time network; diffusion.process is "
                          f"{config.diffusion.process!r}")
    tensors = source.open_source(path)
    fmt = format_of(config, tensors)
    if tensors.config is not None:
        check_against(config, fmt.model_config(tensors.config), example_shape, fmt)
    elif hasattr(fmt, "config_from_tensors"):  # no config.json: what the tensors' shapes say of the model
        check_against(config, fmt.config_from_tensors(tensors), example_shape, fmt,
                      "checkpoint (by its tensors' shapes)")
    options = fmt.rule_options(tensors.config or {})
    if hasattr(fmt, "source_options"):
        options |= fmt.source_options(tensors.names)
    rules = fmt.rules(**options)
    target = getattr(fmt, "TARGET", None)
    filled = abstract_params if target is None else abstract_params[target]
    mapping.plan(rules, filled, tensors, ignore=fmt.IGNORED)

    def read() -> nnx.State:
        if hasattr(fmt, "check_source"):
            fmt.check_source(tensors)
        params, report = mapping.convert(rules, filled, tensors, ignore=fmt.IGNORED)
        logging.info("Imported %s: %s", tensors.describe, report.summary())
        return params if target is None else initialised_around(config, init_params, target, params)

    return read


def initialised_around(config: ml_collections.ConfigDict, init_params: Init, target: str, imported: nnx.State
                       ) -> nnx.State:
    """`init_params`' parameters with `imported` as their `target` subtree and the rest as a new run draws them
    (`training.setup.params_key`): what no checkpoint holds, such as a first stage's discriminator, starts as it
    would without the import. Only the rest is computed."""
    from diffusion_jax.training.setup import params_key  # training imports this package

    prefix = f"{target}/"
    abstract = jax.eval_shape(init_params, jax.random.key(0))
    rest = jax.jit(lambda key: {p: v for p, v in mapping.param_paths(init_params(key)).items()
                                if not p.startswith(prefix)})(params_key(config))
    values = rest | {prefix + p: v for p, v in mapping.param_paths(imported).items()}
    leaves = [values[p] for p in mapping.param_paths(abstract)]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(abstract), leaves)


def import_weights(
    config: ml_collections.ConfigDict, init_params: Init, example_shape: tuple[int, ...],
    path: str | Path | None = None,
) -> nnx.State:
    """The parameters of `model.pretrained` (or `path`) for the model `init_params` initialises (`importer`)."""
    return importer(config, init_params, example_shape, path)()


def config_overrides(path: str | Path, config: ml_collections.ConfigDict) -> dict:
    """The `model.*` fields a diffusers folder's config.json decides ({} for a bare weights file)."""
    tensors = source.open_source(path)
    if tensors.config is None:
        return {}
    return config_overrides_of(format_of(config, tensors).model_config(tensors.config))


def config_overrides_of(derived: dict) -> dict:
    """`derived` (a format's `model_config`) less the data's fields, as config values (tuples, not lists)."""
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in derived.items() if k not in DATA_FIELDS}


__all__ = ["FORMATS", "SOURCE_FORMATS", "autoencoder_kl", "check_against", "config_overrides", "config_overrides_of",
           "dit", "format_of", "import_weights", "importer", "initialised_around", "mapping", "source", "unet2d",
           "unet2d_condition"]
