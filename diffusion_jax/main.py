"""Entry point: `python -m diffusion_jax.main --config=configs/ddpm_digits.py --workdir=runs/x`.

Flags: `--config` (an ml_collections config file; override any field with
`--config.training.num_steps=100`), `--workdir`, `--mode=train|sample|eval`.

Multi-process runs (`diffusion_jax.distributed`; launchers in `launch/`): `--coordinator_address`,
`--num_processes`, `--process_id` (and `--local_device_ids`, `--initialization_timeout`) join
JAX's distributed runtime; without them a SLURM `srun` step, an Open MPI job or a Cloud TPU VM
is detected, and anything else runs as one process.
"""

import os
import re
import sys

from absl import app, flags, logging
from ml_collections import ConfigDict, config_flags

from diffusion_jax.runtime import HUGE_PAGE_MALLOC, configure_xla_flags, reexec_with_huge_page_malloc

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to the experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
flags.DEFINE_enum(
    "mode", "train", ["train", "sample", "eval"],
    "train: train (resuming if possible); sample: write samples; eval: compute config.eval.metrics.",
)
flags.DEFINE_string(
    "coordinator_address", None,
    "Multi-process runs: host:port of process 0's coordinator, the same on every process (e.g. 10.0.0.1:1234).",
)
flags.DEFINE_integer("num_processes", None, "Multi-process runs: the number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-process runs: this process's index, 0..num_processes-1.")
flags.DEFINE_list(
    "local_device_ids", None,
    "Multi-process GPU runs: the GPUs this process drives (e.g. 0,1,2,3,4,5,6,7 for one process per node "
    "under SLURM, where JAX otherwise gives each task one GPU).",
)
flags.DEFINE_integer(
    "initialization_timeout", 300,
    "Multi-process runs: seconds to wait for every process to connect; JAX aborts the process after it.",
)
flags.DEFINE_bool(
    "allow_config_change", False,
    "Resume even though the config changes the model, the diffusion process or the objective of the "
    "workdir's checkpoint (a change of any other field is always allowed, and recorded in config_history.jsonl).",
)
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a misspelled `--config.<path>` override as a one-line error.

    ml_collections raises a KeyError, AttributeError or TypeError (with a traceback) for an
    override of a field the config does not have; this names the flag and lists
    the fields at the level that failed; a config file that does not exist is one line naming
    the path. Other flag errors keep absl's message.
    """
    _check_config_file(argv)
    try:
        rest = app.parse_flags_with_usage(argv)
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
    return rest


def _check_config_file(argv: list[str]) -> None:
    """A `--config` file that does not exist is one line (config_flags fails later, with a traceback)."""
    for i, arg in enumerate(argv):
        match = re.fullmatch(r"-{1,2}config(?:=(.*))?", arg)
        if match:
            value = match[1] if match[1] is not None else (argv[i + 1] if i + 1 < len(argv) else "")
            path = value.split(":", 1)[0]  # a config file may take an argument: file.py:arg
            if path and not os.path.isfile(path):
                sys.exit(f"error: --config: no such file: {path} (relative to {os.getcwd()})")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    configure_xla_flags(FLAGS.config.model.get("name"))  # before JAX starts its backend
    # Imported here so that the XLA flags above are set before anything touches JAX.
    from diffusion_jax import distributed
    from diffusion_jax.errors import ConfigError, TrainingInterrupted, TrainingStopped
    from diffusion_jax.training.preemption import INTERRUPT_EXIT_CODE

    try:  # joins the other processes before any JAX backend starts (jax.distributed requires it)
        cluster = distributed.initialize(
            FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
            distributed.parse_device_ids(FLAGS.local_device_ids), FLAGS.initialization_timeout,
        )
    except ConfigError as e:
        sys.exit(f"error: {e}")

    import jax

    from diffusion_jax.evaluate import evaluate
    from diffusion_jax.sample import sample
    from diffusion_jax.training.checkpoint import is_orbax_save_failure_record
    from diffusion_jax.training.loop import train

    logging.set_verbosity(logging.INFO)
    # INFO lines from this package; only warnings and errors from libraries (orbax, jax), less orbax's
    # tracebacks of a failed checkpoint write, which the Checkpointer reports in one line.
    logging.get_absl_handler().addFilter(
        lambda record: "diffusion_jax" in record.pathname or (
            record.levelno >= logging.converter.STANDARD_WARNING
            and not is_orbax_save_failure_record(record.getMessage())
        )
    )
    if os.environ.get("GLIBC_TUNABLES") == HUGE_PAGE_MALLOC:
        logging.info("glibc malloc on transparent huge pages (GLIBC_TUNABLES=%s; set GLIBC_TUNABLES to choose "
                     "otherwise)", HUGE_PAGE_MALLOC)
    if cluster is not None:
        logging.info(
            "Process %d of %d (cluster from %s): %d local device(s) of %d", jax.process_index(),
            jax.process_count(), cluster, jax.local_device_count(), jax.device_count(),
        )
    try:
        if FLAGS.mode == "train":
            train(FLAGS.config, FLAGS.workdir, allow_config_change=FLAGS.allow_config_change)
        elif FLAGS.mode == "sample":
            sample(FLAGS.config, FLAGS.workdir)
        else:
            evaluate(FLAGS.config, FLAGS.workdir)
    except TrainingInterrupted as e:
        print(e, file=sys.stderr)
        sys.exit(INTERRUPT_EXIT_CODE)
    except KeyboardInterrupt:  # Ctrl-C outside the train loop (building, compiling, sample or eval mode)
        print(f"interrupted (Ctrl-C) in --mode={FLAGS.mode}; checkpoints are as they were", file=sys.stderr)
        sys.exit(INTERRUPT_EXIT_CODE)
    except (ConfigError, TrainingStopped) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    reexec_with_huge_page_malloc()  # before any thread starts; a no-op where GLIBC_TUNABLES is set
    app.run(main, flags_parser=parse_flags)
