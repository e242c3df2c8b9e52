"""Process-level settings: the XLA:CPU flags chosen per model, the persistent compilation cache, and
glibc's malloc on huge pages, and returning the freed heap."""

import os
import platform
import subprocess
import sys
from importlib import metadata

import jax
import pytest

from diffusion_jax import runtime

YNN_OFF = "--xla_cpu_experimental_ynn_fusion_type="


@pytest.mark.skipif(not metadata.version("jaxlib").startswith("0.10."), reason="the flag is measured on jaxlib 0.10")
@pytest.mark.parametrize("model_name,ynn_off", [(None, True), ("unet", True), ("dit", False), ("DiT-S/2", False)])
def test_ynn_fusions_are_turned_off_for_convolutional_models_only(monkeypatch, model_name, ynn_off):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    runtime.configure_xla_flags(model_name)
    flags = runtime.os.environ["XLA_FLAGS"]
    assert flags.startswith("--xla_force_host_platform_device_count=2")  # the user's flags are kept
    assert (YNN_OFF in flags) == ynn_off


def test_a_user_set_ynn_flag_is_left_alone(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=individual_dot")
    runtime.configure_xla_flags("unet")
    assert runtime.os.environ["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=individual_dot"


def test_a_compilation_cache_already_set_wins(tmp_path):
    before = jax.config.jax_compilation_cache_dir
    assert before  # tests/conftest.py sets one, as JAX_COMPILATION_CACHE_DIR would
    runtime.enable_compilation_cache(str(tmp_path))
    runtime.enable_compilation_cache(None)
    assert jax.config.jax_compilation_cache_dir == before


# Child: re-exec if runtime chooses to, then fault in a 256 MiB malloc'd buffer and report the faults.
_CHILD = """
import os, resource, sys
from diffusion_jax import runtime
runtime.reexec_with_huge_page_malloc()
import ctypes
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
size = 256 * 2**20
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
ctypes.memset(libc.malloc(size), 1, size)  # plain malloc: numpy asks for huge pages on its own
print(os.environ.get("GLIBC_TUNABLES"), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _run_child(env_tunables: str | None) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if env_tunables is not None:
        env["GLIBC_TUNABLES"] = env_tunables
    out = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, check=True)
    tunables, faults = out.stdout.split()
    return tunables, int(faults)


@pytest.mark.skipif(not runtime.huge_page_malloc_available(), reason="needs glibc >= 2.35 and transparent huge pages")
def test_the_reexec_puts_large_mallocs_on_huge_pages():
    tunables, faults = _run_child(None)
    assert tunables == runtime.HUGE_PAGE_MALLOC
    _, faults_without = _run_child("glibc.malloc.hugetlb=0")  # the user's setting wins: no re-exec
    assert faults_without >= 60_000  # 256 MiB in 4 KiB pages
    assert faults < faults_without / 20  # 2 MiB pages (with some 4 KiB fallbacks)


def test_no_reexec_where_the_user_set_glibc_tunables():
    assert _run_child("glibc.malloc.hugetlb=0")[0] == "glibc.malloc.hugetlb=0"


FRAGMENTED_HEAP = """
import ctypes, os, sys
from diffusion_jax.runtime import release_free_heap
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]

def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

blocks = [libc.malloc(4096) for _ in range(50_000)]  # 200 MB of small chunks on the brk heap
for b in blocks:
    ctypes.memset(b, 1, 4096)
for i, b in enumerate(blocks):
    if i % 16:  # every 16th block stays and pins the heap: glibc cannot shrink it from the top
        libc.free(b)
before = rss_mb()
assert release_free_heap()
print(before - rss_mb())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_release_free_heap_returns_freed_pages_to_the_os():
    out = subprocess.run([sys.executable, "-c", FRAGMENTED_HEAP], capture_output=True, text=True, check=True,
                         env={**os.environ, "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
    assert float(out.stdout) > 100  # of the ~190 MB freed between the pinned blocks
