"""Test-wide setup: 8 simulated CPU devices (for sharded code) and shared fixtures.

XLA reads its flags when JAX starts its backend, so they are set here, before any
test module runs a JAX computation.
"""

import os
import tempfile

# 8 simulated devices share 2 cores. XLA:CPU aborts the process (SIGABRT, exit 134) when an
# all-reduce rendezvous waits past xla_cpu_collective_call_terminate_timeout_seconds (default 40 s);
# under load a device's thread can be that late, so the limit is 300 s here (a real deadlock still
# fails within minutes rather than hanging the CI).
os.environ["XLA_FLAGS"] = (
    f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"
    " --xla_cpu_collective_call_warn_stuck_timeout_seconds=60"
    " --xla_cpu_collective_call_terminate_timeout_seconds=300"
).strip()

from diffusion_jax.runtime import configure_xla_flags  # noqa: E402

configure_xla_flags()

import jax  # noqa: E402

# XLA:CPU with several devices deadlocks when the host runs far ahead of the devices: once 32
# computations are queued on a device, the next launch blocks a thread of the client's pool (8
# threads for 8 devices) and the queued work that would free it needs one of those threads. The
# train loop bounds its run-ahead (loop._Metrics.add); synchronous dispatch also runs programs
# without collectives inline, so a test that loops over small sharded computations queues nothing.
jax.config.update("jax_cpu_enable_async_dispatch", False)

# Tests build the same tiny programs many times (each train() call traces new closures);
# the persistent cache turns the repeats into cache hits.
jax.config.update("jax_compilation_cache_dir", os.path.join(tempfile.gettempdir(), "diffusion_jax_test_xla_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from diffusion_jax.config import base_config, config_from_file  # noqa: E402
from diffusion_jax.data import prepare_digits  # noqa: E402


@pytest.fixture(scope="session")
def digits_data_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tfds data dir with the embedded digits prepared once for the whole session."""
    directory = str(tmp_path_factory.mktemp("tfds"))
    prepare_digits(directory)
    return directory


def tiny_digits_config(data_dir: str) -> ml_collections.ConfigDict:
    """A digits run small enough to compile and train in seconds: 8x8, a 2-level U-Net."""
    config = base_config()
    config.data.update(name="digits", image_size=8, data_dir=data_dir)
    config.model.update(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.1)
    config.diffusion.num_timesteps = 100
    config.optim.update(learning_rate=1e-3, warmup_steps=2)
    config.training.update(
        batch_size=16, num_steps=4, log_every=2, checkpoint_every=2, sample_every=4, ema_decays=(0.9, 0.99)
    )
    config.sample.update(sampler="ddim", steps=5, num_samples=8, batch_size=8, ema_decay=0.99)
    return config


def changed(config: ml_collections.ConfigDict, fields: dict) -> ml_collections.ConfigDict:
    """`config` with dotted `fields` ({'model.learn_sigma': True}) set."""
    config.update_from_flattened_dict(fields)
    return config


def assert_build_errors(cases: list[tuple[ml_collections.ConfigDict, str]]) -> None:
    """Each config's `experiment.build` fails before compiling with a ConfigError matching its regex."""
    from diffusion_jax.errors import ConfigError
    from diffusion_jax.training import experiment

    for config, message in cases:
        with pytest.raises(ConfigError, match=message):
            experiment.build(config)


def load_config(name: str) -> ml_collections.ConfigDict:
    """configs/<name>.py, loaded from its file as the entry point loads it."""
    return config_from_file(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                                         f"{name}.py"))


def swissroll_config() -> ml_collections.ConfigDict:
    return load_config("ddpm_swissroll")


def nearest_distance(points: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Each point's distance to its nearest neighbour in `reference` ([N, D], [M, D] -> [N])."""
    d = np.linalg.norm(points[:, None, :] - reference[None, :, :], axis=-1)
    return d.min(axis=1)
