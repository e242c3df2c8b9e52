"""Process-level settings, applied by the entry point before JAX's backend starts: XLA flags,
the persistent compilation cache, and glibc's malloc on huge pages."""

import os
import platform
import sys
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


HUGE_PAGE_MALLOC = "glibc.malloc.hugetlb=1"
_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def huge_page_malloc_available() -> bool:
    """Linux with glibc >= 2.35 (the `glibc.malloc.hugetlb` tunable) and transparent huge pages
    in `always` or `madvise` mode."""
    if not sys.platform.startswith("linux"):
        return False
    libc, version = platform.libc_ver()
    if libc != "glibc" or tuple(int(v) for v in version.split(".")[:2]) < (2, 35):
        return False
    try:
        with open(_THP_SETTING) as f:
            mode = f.read()
    except OSError:
        return False
    return "[always]" in mode or "[madvise]" in mode


def reexec_with_huge_page_malloc() -> None:
    """Restarts this process once (same PID, same arguments) with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`.

    XLA:CPU mallocs each call's temporary buffer (235 MB for the small U-Net's train step, 2.6 GB
    for DiT-S/2's); glibc serves it with mmap and unmaps it on free, so every step faults it in
    again, 4 KiB at a time (59k faults and 0.10 s of system CPU per small U-Net step, 848k and
    1.4 s per DiT step; benchmarks/README.md). With the tunable glibc asks for transparent huge
    pages, which cuts the faults ~500x. glibc reads tunables only at process start, hence the
    re-exec. Does nothing when GLIBC_TUNABLES is already set (the user's choice, e.g.
    `glibc.malloc.hugetlb=0` to opt out) or where huge pages are unavailable.
    Call it first thing in an entry point, before any thread starts.
    """
    if "GLIBC_TUNABLES" in os.environ or not huge_page_malloc_available():
        return
    env = dict(os.environ, GLIBC_TUNABLES=HUGE_PAGE_MALLOC)
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def release_free_heap() -> bool:
    """Returns the C heap's free pages to the OS (glibc's `malloc_trim(0)`); False where there is no glibc.

    XLA's compiler frees most of what it allocated once a program is compiled, but glibc keeps the
    freed heap mapped: after compiling the small U-Net's train step the process held 1.25 GB, of which
    510 MB was free heap, and RSS stayed ~530 MB above what the steps need (benchmarks/README.md,
    "Memory"). Called after compiling the train step; the peak (during compilation) is unchanged.
    """
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return True

