"""`python -m diffusion_jax.convert --from=PATH --out=WORKDIR --config=configs/X.py` (or `--model=PRESET`):
import a PyTorch / diffusers checkpoint into a workdir that sample and eval mode read and training resumes.

The workdir gets an orbax checkpoint of step 0 (the imported weights as the parameters and as every EMA),
`config.json` (the config, with the fields a diffusers config.json decides adopted from it, each change
logged) and `imported_from.json` (the source, what was read, and the mapping's summary). The saved config's
`model.pretrained` is None: the weights now live in the checkpoint, so the source file may be moved.

    python -m diffusion_jax.convert --from=ddpm-cifar10-32/unet --model=ddpm_cifar10 --out=runs/ddpm_cifar10_google
    python -m diffusion_jax.main --config=configs/ddpm_cifar.py --config.model.time_freq_shift=1 \\
        --workdir=runs/ddpm_cifar10_google --mode=sample
"""

import copy
import json
import os
import sys
from pathlib import Path

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from diffusion_jax.errors import ConfigError

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")
PRESETS = {  # --model: the config file whose model the checkpoint is
    "ddpm_cifar10": "ddpm_cifar.py",  # google/ddpm-cifar10-32 (its unet/ folder)
    "dit_xl2": "dit_xl2_imagenet256.py",  # DiT-XL-2-256x256.pt, or facebook/DiT-XL-2-256's transformer/ folder
    "sd_vae": "sd_vae.py",  # stabilityai/sd-vae-ft-ema or -mse
}


def write_workdir(config: ml_collections.ConfigDict, path: str | Path, out: str | Path) -> Path:
    """Imports `path` into a new workdir `out` for `config`'s model (see the module docstring); returns `out`."""
    from diffusion_jax import convert
    from diffusion_jax.training import experiment, run_config
    from diffusion_jax.training.checkpoint import Checkpointer

    out = Path(out)
    if (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()):
        raise ConfigError(f"--out: {out} already holds checkpoints; import into a new directory")
    config = copy.deepcopy(config)
    with config.unlocked():  # a checkpoint may decide model fields the config file leaves to the defaults
        for field, value in convert.config_overrides(path, config).items():
            if config.model.get(field) != value:
                logging.info("model.%s: %r -> %r (from %s's config.json)", field, config.model.get(field), value,
                             path)
                config.model[field] = value
        config.model.pretrained = str(path)
    exp = experiment.build(config)  # checks names, shapes and config.json before reading a weight
    state = exp.init_state()  # reads them
    config.model.pretrained = None  # the checkpoint holds them from here on
    out.mkdir(parents=True, exist_ok=True)
    checkpointer = Checkpointer(out / "checkpoints")
    try:
        checkpointer.save(0, state, config)
    finally:
        checkpointer.close()
    run_config.write_config_file(out, config)
    source = convert.source.open_source(path)
    (out / "imported_from.json").write_text(json.dumps(
        {"source": str(Path(path).resolve()), "read": source.describe, "tensors": len(source.names)}, indent=2) + "\n")
    logging.info("Wrote %s: step 0 of %s", out, source.describe)
    return out


FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags; defined only when it runs, so importing the package defines none."""
    flags.DEFINE_string("from", None, "The checkpoint: .safetensors, a diffusers folder, or a PyTorch .pt/.bin.")
    flags.DEFINE_string("out", None, "The workdir to write (new, or without checkpoints).")
    flags.DEFINE_enum("model", None, list(PRESETS), "A preset: the config of a known checkpoint (or --config).")
    config_flags.DEFINE_config_file("config", None, "The config whose model the checkpoint is (or --model).",
                                    lock_config=False)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.INFO)
    try:
        if FLAGS["from"].value is None or FLAGS.out is None:
            raise ConfigError("--from, --out: both are required")
        if (FLAGS.config is None) == (FLAGS.model is None):
            raise ConfigError(f"--config, --model: give one (presets: {', '.join(PRESETS)})")
        if FLAGS.config is not None:
            config = FLAGS.config
        else:
            from diffusion_jax.config import config_from_file

            config = config_from_file(os.path.join(CONFIGS, PRESETS[FLAGS.model]))
        write_workdir(config, FLAGS["from"].value, FLAGS.out)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    define_flags()
    app.run(main)
