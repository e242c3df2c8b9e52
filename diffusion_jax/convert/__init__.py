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

  model.name   checkpoint                         module
  'unet'       diffusers UNet2DModel (DDPM)        `convert.unet2d`
"""

from __future__ import annotations

import types
from pathlib import Path

import ml_collections
from absl import logging
from flax import nnx

from diffusion_jax.convert import mapping, source, unet2d
from diffusion_jax.errors import ConfigError

FORMATS: dict[str, types.ModuleType] = {"unet": unet2d}  # model.name -> its format module

# our model fields a checkpoint's config.json decides, and where the data's shape lives for the rest
DATA_FIELDS = {"image_size": "data.image_size", "in_channels": "the data's channels"}


def format_of(config: ml_collections.ConfigDict) -> types.ModuleType:
    """The format module that imports into `model.name`."""
    name = config.model.name
    if name not in FORMATS:
        raise ConfigError(f"model.pretrained: no importer for model.name={name!r}; there are: {', '.join(FORMATS)}")
    return FORMATS[name]


def check_against(config: ml_collections.ConfigDict, derived: dict, example_shape: tuple[int, ...]) -> None:
    """A one-line ConfigError where the checkpoint's config.json (as our fields, `derived`) contradicts `config`."""
    have = {"image_size": example_shape[0], "in_channels": example_shape[-1]}
    for field, value in derived.items():
        if field in DATA_FIELDS:
            mine, where = have[field], DATA_FIELDS[field]
        else:
            mine, where = config.model.get(field), f"model.{field}"
        mine = tuple(mine) if isinstance(mine, list | tuple) else mine
        if mine != value and not (field == "num_heads" and derived.get("num_head_channels") is not None):
            raise ConfigError(f"{where}: {mine!r} in this config, but model.pretrained's config.json makes it "
                              f"{value!r}; set it so, or use a checkpoint of this model")


def import_weights(
    config: ml_collections.ConfigDict, abstract_params: nnx.State, example_shape: tuple[int, ...],
    path: str | Path | None = None,
) -> nnx.State:
    """The parameters of `model.pretrained` (or `path`) in the structure of `abstract_params`, this config's
    model. Only discrete-time networks are imported (the checkpoints are DDPM-style ε/v networks)."""
    path = path or config.model.get("pretrained")
    if config.diffusion.get("process", "discrete") != "discrete":
        raise ConfigError(f"model.pretrained: imports a discrete-time network; diffusion.process is "
                          f"{config.diffusion.process!r}")
    fmt = format_of(config)
    tensors = source.open_source(path)
    if tensors.config is not None:
        check_against(config, fmt.model_config(tensors.config), example_shape)
    rules = fmt.rules(**fmt.rule_options(tensors.config or {}))
    params, report = mapping.convert(rules, abstract_params, tensors, ignore=fmt.IGNORED)
    logging.info("Imported %s: %s", tensors.describe, report.summary())
    return params


def config_overrides(path: str | Path, config: ml_collections.ConfigDict) -> dict:
    """The `model.*` fields a diffusers folder's config.json decides ({} for a bare weights file)."""
    tensors = source.open_source(path)
    return {} if tensors.config is None else config_overrides_of(format_of(config).model_config(tensors.config))


def config_overrides_of(derived: dict) -> dict:
    """`derived` (a format's `model_config`) less the data's fields, as config values (tuples, not lists)."""
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in derived.items() if k not in DATA_FIELDS}


__all__ = ["FORMATS", "check_against", "config_overrides", "config_overrides_of", "format_of", "import_weights",
           "mapping", "source", "unet2d"]
