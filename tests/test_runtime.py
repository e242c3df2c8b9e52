"""Process-level settings: the XLA:CPU flags chosen per model, and the persistent compilation cache."""

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
