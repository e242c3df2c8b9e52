"""Where imported weights come from: a name -> tensor store read one tensor at a time.

`open_source(path)` reads, in this order of trust:
- a `.safetensors` file, through the `safetensors` package's NumPy API (no torch, nothing executed; bf16
  tensors are widened to float32 through `ml_dtypes`, which JAX already depends on);
- a diffusers model folder: its `config.json` and `diffusion_pytorch_model.safetensors` (or the sharded
  `*.safetensors.index.json`), or failing those its `.bin`;
- a PyTorch `.pt` / `.pth` / `.bin` file, only through `torch.load(..., weights_only=True, mmap=True)` (torch's
  restricted unpickler, which refuses anything but tensors and plain containers) and only where torch is
  installed (`pip install 'diffusion_jax[torch]'`). A checkpoint that nests its weights under one of
  'ema', 'state_dict', 'model' is read from there.

Tensors are read when asked for (`get`), so converting holds the model being built plus one tensor.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from diffusion_jax.errors import ConfigError

NESTED_KEYS = ("ema", "state_dict", "model")  # where training checkpoints keep their weights, in this order


class TensorSource:
    """Named tensors from one checkpoint: `names`, `shape(name)`, `get(name)` -> float32 NumPy array, and
    `config` (a diffusers folder's config.json, else None); `describe` says what was read."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], read: Any, describe: str, config: dict | None = None):
        self._shapes, self._read = shapes, read
        self.describe, self.config = describe, config

    @property
    def names(self) -> list[str]:
        return list(self._shapes)

    def __contains__(self, name: str) -> bool:
        return name in self._shapes

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def get(self, name: str) -> np.ndarray:
        return np.asarray(self._read(name), np.float32)


def open_source(path: str | Path, field: str = "model.pretrained") -> TensorSource:
    """The tensors at `path` (see the module docstring); a path that is none of those is a ConfigError naming
    `field`."""
    path = Path(path).expanduser()
    if path.is_dir():
        return _diffusers_folder(path, field)
    if not path.is_file():
        raise ConfigError(f"{field}: no file or folder at {path}")
    if path.suffix == ".safetensors":
        return _safetensors([path], f"safetensors file {path}")
    if path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        return _torch_file(path, field)
    raise ConfigError(f"{field}: {path.name} is neither .safetensors nor a PyTorch .pt/.pth/.bin/.ckpt, nor a "
                      "diffusers folder")


def _diffusers_folder(folder: Path, field: str) -> TensorSource:
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else None
    index = sorted(folder.glob("*.safetensors.index.json"))
    if index:
        shards = sorted({folder / f for f in json.loads(index[0].read_text())["weight_map"].values()})
        source = _safetensors(shards, f"diffusers folder {folder} ({len(shards)} safetensors shards)")
    elif (folder / "diffusion_pytorch_model.safetensors").is_file():
        source = _safetensors([folder / "diffusion_pytorch_model.safetensors"], f"diffusers folder {folder}")
    elif (folder / "diffusion_pytorch_model.bin").is_file():
        source = _torch_file(folder / "diffusion_pytorch_model.bin", field)
    else:
        found = sorted(p.name for p in folder.iterdir())[:10]
        raise ConfigError(f"{field}: {folder} holds no diffusion_pytorch_model.safetensors (or .bin); it has {found}")
    source.config = config
    return source


def _safetensors(files: list[Path], describe: str) -> TensorSource:
    """Each tensor is read through its own short-lived `safe_open`: the file is memory-mapped only while one
    tensor is copied out, so the mapped pages of tensors already converted leave the process's resident set
    (a handle kept open would leave the whole file resident, +1x the model's size at the peak)."""
    from safetensors import safe_open

    shapes, owner, bf16 = {}, {}, set()
    for file in files:
        with safe_open(str(file), framework="np") as handle:
            for name in handle.keys():  # noqa: SIM118  (a safe_open handle is not a dict)
                tensor = handle.get_slice(name)
                shapes[name], owner[name] = tuple(tensor.get_shape()), str(file)
                if tensor.get_dtype() == "BF16":
                    bf16.add(name)

    def read(name: str) -> np.ndarray:
        with safe_open(owner[name], framework="np") as handle:
            if name in bf16:  # NumPy has no bfloat16: the raw 16-bit words, viewed as ml_dtypes' bfloat16
                import ml_dtypes

                return np.array(handle.get_slice(name)[:].view(ml_dtypes.bfloat16), np.float32)
            return handle.get_tensor(name)

    return TensorSource(shapes, read, describe)


def _torch_file(path: Path, field: str) -> TensorSource:
    try:
        import torch
    except ImportError:
        raise ConfigError(f"{field}: {path.name} is a PyTorch pickle; reading one needs torch "
                          "(pip install 'diffusion_jax[torch]'), or convert it to .safetensors") from None
    try:  # memory-mapped where the format allows (torch >= 1.6's zip archive), so tensors are read when used
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # noqa: BLE001  torch's restricted unpickler refused it, or the file is damaged
        raise ConfigError(f"{field}: {path} could not be read with torch.load(weights_only=True): "
                          f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    nested = ""
    for key in NESTED_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state, nested = state[key], f" (its '{key}' entry)"
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{field}: {path} is not a state dict of tensors (nor holds one under "
                          f"{', '.join(NESTED_KEYS)})")
    shapes = {name: tuple(t.shape) for name, t in state.items()}
    return TensorSource(shapes, lambda name: state[name].float().numpy(), f"PyTorch file {path}{nested}")
