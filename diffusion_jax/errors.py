"""The error raised for bad user input: a config field, a flag, a missing file."""


class ConfigError(ValueError):
    """A one-line message naming the config field (or flag) and what is allowed.

    The entry point prints it without a traceback; anything else is a bug and
    keeps its traceback.
    """


class TrainingStopped(RuntimeError):
    """A run stopped on purpose (e.g. a non-finite loss under `training.on_nonfinite='stop'`).

    The entry point prints its one-line message and exits non-zero; what was
    already saved is kept.
    """


class TrainingInterrupted(TrainingStopped):
    """A run stopped by Ctrl-C after saving its current step: the entry point prints the
    message (not as an error) and exits with status 130, the shell's code for Ctrl-C."""
