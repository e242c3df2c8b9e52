"""The error raised for bad user input: a config field, a flag, a missing file."""


class ConfigError(ValueError):
    """A one-line message naming the config field (or flag) and what is allowed.

    The entry point prints it without a traceback; anything else is a bug and
    keeps its traceback.
    """
