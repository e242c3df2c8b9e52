"""Process-level JAX settings, applied by the entry point before the backend starts."""

import os
from importlib import metadata

# jaxlib 0.10's default XLA:CPU "ynn" fusions made a Flax U-Net train step 35-40% slower
# (shared/notes/perf-2026-11.md), but the DiT-S/2 train step 1.7-2.0x *faster* (benchmarks/README.md,
# 2026-11-24: 2.80-3.25 against 1.64 images/s). They are turned off for convolutional models only.
# The flag's name changes between jaxlib releases, and XLA aborts on an unknown flag, so it is set
# only where measured.
_CPU_FLAGS_BY_JAXLIB = {"0.10.": "--xla_cpu_experimental_ynn_fusion_type="}
_KEEP_YNN_MODELS = ("dit",)  # model names (lower case, prefix) whose measured steps are faster with ynn


def configure_xla_flags(model_name: str | None = None) -> None:
    """Adds the measured XLA:CPU flags for `model_name` (`config.model.name`; None: a U-Net's)
    to XLA_FLAGS unless the user already set them.

    Must run before the first JAX computation (XLA reads its flags at backend start), so one
    process gets one choice. It does nothing on GPU/TPU runs beyond setting a CPU-only flag.
    """
    if model_name is not None and model_name.lower().startswith(_KEEP_YNN_MODELS):
        return
    try:
        version = metadata.version("jaxlib")
    except metadata.PackageNotFoundError:
        return
    flags = os.environ.get("XLA_FLAGS", "")
    for prefix, flag in _CPU_FLAGS_BY_JAXLIB.items():
        name = flag.split("=")[0]
        if version.startswith(prefix) and name not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} {flag}".strip()


def enable_compilation_cache(directory: str | None) -> None:
    """JAX's persistent compilation cache in `directory` (None: off), unless one is already set.

    A restarted or preempted run, and every run of the same config, then loads its compiled
    programs instead of compiling them again (the train step of the CIFAR U-Net takes tens of
    seconds to compile). `JAX_COMPILATION_CACHE_DIR` or an earlier `jax.config.update` wins.
    """
    import jax

    if directory is None or jax.config.jax_compilation_cache_dir:
        return
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(directory))
