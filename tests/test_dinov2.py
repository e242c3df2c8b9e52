"""DINOv2 (Oquab et al. 2023) against Hugging Face's `Dinov2Model` / `Dinov2WithRegistersModel`: the patch tokens
at the pretraining grid and at another, the position embeddings' bicubic resampling, the architecture read from
config.json or from the tensors' shapes, and the import's one-line errors."""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file
from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

from diffusion_jax.convert import dinov2
from diffusion_jax.errors import ConfigError
from diffusion_jax.models.dinov2 import resample_matrix

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=56, patch_size=14)  # 4 x 4 grid


def save_tiny_dinov2(folder: Path, registers: bool = False, **config) -> torch.nn.Module:
    """A random tiny Hugging Face DINOv2 saved as `folder`/{model.safetensors, config.json}; returns it. Every
    parameter is moved off its initialisation (γ = 1, LayerNorm = identity) and the position embeddings are
    N(0, 1), so that each, and their resampling, shows in the tokens."""
    torch.manual_seed(0)
    model_class, config_class = ((Dinov2WithRegistersModel, Dinov2WithRegistersConfig) if registers
                                 else (Dinov2Model, Dinov2Config))
    model = model_class(config_class(**(TINY | config))).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) if "position" in name else p + 0.2 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


def hf_patch_tokens(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    """Hugging Face's normalised patch tokens [B, h w, D] of NHWC `images`."""
    registers = getattr(model.config, "num_register_tokens", 0)
    with torch.no_grad():
        out = model(torch.from_numpy(images.transpose(0, 3, 1, 2))).last_hidden_state
    return out[:, 1 + registers:].numpy()


@pytest.mark.parametrize("antialias", [False, True])
def test_position_resampling_is_torchs_bicubic(antialias):
    grid = np.random.default_rng(0).normal(size=(1, 3, 37, 37)).astype(np.float32)
    for size in (16, 6, 40):
        expected = torch.nn.functional.interpolate(torch.from_numpy(grid), size=(size, size), mode="bicubic",
                                                   align_corners=False, antialias=antialias).numpy()[0]
        m = resample_matrix(37, size, antialias)
        np.testing.assert_allclose(np.einsum("ia,cab,jb->cij", m, grid[0], m), expected, atol=1e-5)


# Dinov2Model at its 4 x 4 pretraining grid and at 3 x 5 (position embeddings resampled); with registers, SwiGLU and
# the antialiased resampling at 3 x 5
@pytest.mark.parametrize("registers,sizes", [(False, ((56, 56), (42, 70))), (True, ((42, 70),))])
def test_patch_tokens_match_hugging_face(tmp_path, registers, sizes):
    reference = save_tiny_dinov2(tmp_path, registers, use_swiglu_ffn=registers,
                                 **({"num_register_tokens": 3} if registers else {}))
    model = dinov2.load(tmp_path)
    forward = jax.jit(lambda images: model(images))
    rng = np.random.default_rng(1)
    for size in sizes:
        images = rng.normal(size=(2, *size, 3)).astype(np.float32)
        tokens = np.asarray(forward(jnp.asarray(images)))
        assert tokens.shape == (2, size[0] // 14, size[1] // 14, 32)
        error = np.abs(tokens.reshape(2, -1, 32) - hf_patch_tokens(reference, images)).max()
        print(f"registers={registers} {size}: max abs error {error:.2e}")
        assert error < 2e-5
    resampled = model.position_embeddings(3, 5)
    model.antialias = not registers  # the other class's resampling moves the N(0, 1) embeddings far from HF's
    assert np.abs(model.position_embeddings(3, 5) - resampled).max() > 0.1


def test_the_architecture_reads_from_config_json_or_from_shapes(tmp_path):
    save_tiny_dinov2(tmp_path, registers=True, use_swiglu_ffn=True, num_register_tokens=2, hidden_size=64,
                     num_attention_heads=1)  # 64 per head, as every DINOv2: readable without config.json
    from_config = dinov2.model_config(dinov2.open_checkpoint(tmp_path))
    assert from_config["swiglu"] and from_config["antialias"] and from_config["num_register_tokens"] == 2
    (tmp_path / "config.json").unlink()
    from_shapes = dinov2.model_config(dinov2.open_checkpoint(tmp_path / "model.safetensors"))
    assert from_shapes.items() <= from_config.items() and len(from_shapes) >= len(from_config) - 2
    assert dinov2.width(tmp_path) == 64


def rewritten(source: Path, folder: Path, change: dict) -> Path:
    """A copy of the checkpoint at `source` with tensors replaced (an array) or dropped (None)."""
    folder.mkdir()
    with safe_open(str(source / "model.safetensors"), framework="np") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    for name, value in change.items():
        tensors.pop(name) if value is None else tensors.update({name: value})
    save_file(tensors, str(folder / "model.safetensors"))
    shutil.copy(source / "config.json", folder)
    return folder


def test_a_bad_checkpoint_is_a_one_line_error_naming_the_tensor(tmp_path):
    save_tiny_dinov2(tmp_path / "good")
    (tmp_path / "weights.pth").write_bytes(b"\0")
    (tmp_path / "noise.safetensors").write_bytes(b"not a safetensors file")
    (tmp_path / "empty").mkdir()
    cases = [
        (rewritten(tmp_path / "good", tmp_path / "missing", {"encoder.layer.1.norm2.weight": None}),
         r"^repa.encoder_path: .* lacks 1 tensors the model needs: encoder.layer.1.norm2.weight$"),
        (rewritten(tmp_path / "good", tmp_path / "misshapen", {"layernorm.weight": np.ones(31, np.float32)}),
         r"^repa.encoder_path: norm/scale has shape \(32,\) here, but layernorm.weight \(31,\) makes \(31,\)"),
        (rewritten(tmp_path / "good", tmp_path / "extra", {"pooler.weight": np.ones(3, np.float32)}),
         r"^repa.encoder_path: 1 tensors of .* are used by no rule .*: pooler.weight$"),
        (tmp_path / "absent", r"^repa.encoder_path: no file or folder at .*absent$"),
        (tmp_path / "weights.pth", r"^repa.encoder_path: .*weights.pth is neither a .safetensors file nor a folder"),
        (tmp_path / "empty", r"^repa.encoder_path: .*empty is neither a .safetensors file nor a folder"),
        (tmp_path / "noise.safetensors", r"^repa.encoder_path: .*noise.safetensors is not a readable safetensors"),
    ]
    for path, message in cases:
        with pytest.raises(ConfigError, match=message) as error:
            dinov2.load(path)
        assert "\n" not in str(error.value)
    config = json.loads((tmp_path / "good" / "config.json").read_text()) | {"hidden_act": "relu"}
    (tmp_path / "good" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"^repa.encoder_path: config.json's hidden_act is 'relu'"):
        dinov2.load(tmp_path / "good")
