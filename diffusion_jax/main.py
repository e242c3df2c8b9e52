"""Entry point: `python -m diffusion_jax.main --config=configs/ddpm_digits.py --workdir=runs/x`.

Flags: `--config` (an ml_collections config file; override any field with
`--config.training.num_steps=100`), `--workdir`, `--mode=train|sample|eval`.
"""

import re
import sys

from absl import app, flags, logging
from ml_collections import ConfigDict, config_flags

from diffusion_jax.runtime import configure_xla_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to the experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
flags.DEFINE_enum(
    "mode", "train", ["train", "sample", "eval"],
    "train: train (resuming if possible); sample: write samples; eval: compute config.eval.metrics.",
)
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a misspelled `--config.<path>` override as a one-line error.

    ml_collections raises a KeyError, AttributeError or TypeError (with a traceback) for an
    override of a field the config does not have; this names the flag and lists
    the fields at the level that failed. Other flag errors keep absl's message.
    """
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError, TypeError):
        config_file = flags.FlagValues()  # only --config, to load the config the overrides apply to
        flags.DEFINE_string("config", None, "", flag_values=config_file)
        config_file(argv, known_only=True)
        config = FLAGS["config"].parser.parse(config_file.config)
        for override in (m[1] for m in map(re.compile(r"-{1,2}(?:no)?config\.([^=]+)").match, argv) if m):
            node, keys, error = config, override.split("."), f"error: --config.{override}:"
            for depth, key in enumerate(keys):
                path = ".".join(["config", *keys[:depth]]) if depth else "the config"
                if not isinstance(node, ConfigDict):
                    sys.exit(f"{error} {path} is {node!r}, not a section with fields")
                if key not in node:
                    sys.exit(f"{error} no field {key!r} in {path}; its fields are: {', '.join(node)}")
                node = node[key]
        raise


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    configure_xla_flags()  # before JAX starts its backend
    # Imported here so that the XLA flags above are set before anything touches JAX.
    from diffusion_jax.errors import ConfigError, TrainingStopped
    from diffusion_jax.evaluate import evaluate
    from diffusion_jax.sample import sample
    from diffusion_jax.training.loop import train

    logging.set_verbosity(logging.INFO)
    # INFO lines from this package; only warnings and errors from libraries (orbax, jax).
    logging.get_absl_handler().addFilter(
        lambda record: record.levelno >= logging.converter.STANDARD_WARNING or "diffusion_jax" in record.pathname
    )
    try:
        if FLAGS.mode == "train":
            train(FLAGS.config, FLAGS.workdir)
        elif FLAGS.mode == "sample":
            sample(FLAGS.config, FLAGS.workdir)
        else:
            evaluate(FLAGS.config, FLAGS.workdir)
    except (ConfigError, TrainingStopped) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
