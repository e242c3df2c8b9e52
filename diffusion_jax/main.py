"""Entry point: `python -m diffusion_jax.main --config=configs/ddpm_digits.py --workdir=runs/x`.

Flags: `--config` (an ml_collections config file; override any field with
`--config.training.num_steps=100`), `--workdir`, `--mode=train|sample`.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from diffusion_jax.runtime import configure_xla_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to the experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
flags.DEFINE_enum("mode", "train", ["train", "sample"], "train: train (resuming if possible); sample: sample.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    configure_xla_flags()  # before JAX starts its backend
    # Imported here so that the XLA flags above are set before anything touches JAX.
    from diffusion_jax.errors import ConfigError
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
        else:
            sample(FLAGS.config, FLAGS.workdir)
    except ConfigError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(main)
