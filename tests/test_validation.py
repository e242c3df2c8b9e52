"""validate_config's field rules, the shipped configs, and misspelled command-line overrides."""

import math
import os
import subprocess
import sys
import time

import ml_collections
import pytest
from conftest import load_config

from diffusion_jax.config import base_config
from diffusion_jax.errors import ConfigError
from diffusion_jax.validation import validate_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(name[:-3] for name in os.listdir(os.path.join(ROOT, "configs")) if name.endswith(".py"))


def with_value(field: str, value: object) -> ml_collections.ConfigDict:
    """The base config with `field` set to `value`, bypassing ConfigDict's type safety (as a config file may)."""
    fields = base_config().to_dict()
    *parents, leaf = field.split(".")
    holder = fields
    for key in parents:
        holder = holder[key]
    holder[leaf] = value
    return ml_collections.ConfigDict(fields, type_safe=False)


def validation_error(config: ml_collections.ConfigDict, num_devices: int = 1, num_processes: int = 1) -> str:
    with pytest.raises(ConfigError) as info:
        validate_config(config, num_devices, num_processes)
    message = str(info.value)
    assert "\n" not in message
    return message


BAD_VALUES = [
    ("seed", -1),
    ("seed", True),
    ("seed", 1.5),
    ("seed", None),
    ("data.image_size", 0),
    ("data.random_flip", 1),
    ("model.ch", 0),
    ("model.ch", True),
    ("model.ch_mult", ()),
    ("model.ch_mult", (1, 0)),
    ("model.ch_mult", 2),
    ("model.num_res_blocks", 0),
    ("model.attn_resolutions", (16.0,)),
    ("model.dropout", 1.0),
    ("model.dropout", -0.1),
    ("model.num_classes", 0),
    ("diffusion.num_timesteps", 0),
    ("diffusion.min_snr_gamma", 0.0),
    ("optim.learning_rate", 0.0),
    ("optim.learning_rate", math.nan),
    ("optim.learning_rate", math.inf),
    ("optim.learning_rate", "1e-3"),
    ("optim.warmup_steps", -1),
    ("optim.warmup_steps", 10.0),
    ("optim.grad_clip_norm", -1.0),
    ("optim.b1", 1.0),
    ("optim.b2", -0.5),
    ("optim.eps", 0.0),
    ("optim.weight_decay", -1e-4),
    ("training.batch_size", 0),
    ("training.batch_size", False),
    ("training.num_steps", 0),
    ("training.log_every", -1),
    ("training.checkpoint_every", 1.5),
    ("training.sample_every", True),
    ("training.keep_checkpoints", 0),
    ("training.ema_decays", 0.999),
    ("training.ema_decays", (0.999, 1.0)),
    ("training.ema_decays", ("0.9",)),
    ("training.on_nonfinite", "ignore"),
    ("sample.batch_size", 0),
    ("sample.num_samples", 0),
    ("sample.steps", 0),
    ("sample.steps", 1001),
    ("sample.eta", -1.0),
    ("sample.png_scale", 0),
    ("sample.ema_decay", 1.0),
]


@pytest.mark.parametrize("field,value", BAD_VALUES)
def test_bad_value_names_the_field(field, value):
    assert validation_error(with_value(field, value)).startswith(f"{field}: ")


def test_message_says_what_is_allowed():
    message = validation_error(with_value("optim.b1", 1.0))
    assert message == "optim.b1: got 1.0; expected a float in [0, 1)"


def test_missing_required_field():
    config = base_config()
    del config.optim["eps"]
    assert validation_error(config).startswith("optim.eps: missing")


def test_batch_size_not_divisible_by_devices_suggests_nearest():
    message = validation_error(with_value("training.batch_size", 100), num_devices=8)
    assert message.startswith("training.batch_size: 100 ")
    assert "8 devices" in message and "96 or 104" in message
    message = validation_error(with_value("training.batch_size", 6), num_devices=8)
    assert "e.g. 8" in message


def test_batch_size_not_divisible_by_processes():
    message = validation_error(with_value("training.batch_size", 18), num_devices=6, num_processes=4)
    assert "6 devices and 4 processes" in message and "12 or 24" in message


def test_sample_batch_size_not_divisible_by_devices():
    config = with_value("sample.batch_size", 12)
    assert validation_error(config, num_devices=8).startswith("sample.batch_size: 12 ")


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("num_devices", [1, 8])
def test_shipped_configs_pass(name, num_devices):
    config = load_config(name)
    if num_devices > 1 and (config.training.batch_size % num_devices or config.sample.batch_size % num_devices):
        pytest.skip(f"{name}'s batch sizes are not divisible by {num_devices}")
    validate_config(config, num_devices=num_devices, num_processes=1)


@pytest.mark.parametrize(
    "override,message",
    [
        (
            "--config.trainng.lr=1",
            "error: --config.trainng.lr: no field 'trainng' in the config; its fields are: autoencode, consistency, "
            "controlnet, data, diffusion, distill, eval, flow, inverse, latent,",
        ),
        (
            "--config.training.bsz=8",
            "error: --config.training.bsz: no field 'bsz' in config.training; its fields are: batch_size,",
        ),
    ],
    ids=["section", "leaf"],
)
def test_misspelled_override_is_one_line(tmp_path, override, message):
    flags = ["--config=configs/ddpm_digits.py", f"--workdir={tmp_path}", override]
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "diffusion_jax.main", *flags], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert time.monotonic() - start < 30
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().startswith(message) and "\n" not in result.stderr.strip(), result.stderr
