"""Hugging Face DINOv2 checkpoints (`facebook/dinov2-{small,base,large,giant}`, `facebook/dinov2-with-registers-*`:
`model.safetensors`, with its `config.json` beside it) -> `models.dinov2.DINOv2` (Oquab et al. 2023, arXiv
2304.07193), a frozen feature extractor rather than a diffusion model: `load(path)` builds it, `width(path)` reads
D alone. Read through `convert.source` (the safetensors NumPy API: nothing is unpickled); one name per tensor:

    ours                          Hugging Face (`encoder.layer.i` = el.i)
    patch_embed                   embeddings.patch_embeddings.projection      (OIHW -> HWIO)
    cls_token, pos_embed          embeddings.cls_token, embeddings.position_embeddings
    register_tokens               embeddings.register_tokens                   (with registers)
    blocks/i/norm{1,2}            el.i.norm{1,2}
    blocks/i/attn/qkv             el.i.attention.attention.{query,key,value}   (concatenated)
    blocks/i/attn/proj            el.i.attention.output.dense
    blocks/i/ls{1,2}/gamma        el.i.layer_scale{1,2}.lambda1
    blocks/i/mlp/fc{1,2}          el.i.mlp.fc{1,2}                             (ViT-S/B/L)
    blocks/i/mlp/weights_{in,out} el.i.mlp.weights_{in,out}                    (ViT-g's SwiGLU)
    norm                          layernorm

`mask_token` (masked-image pretraining only) is ignored. The architecture comes from config.json where there is
one (its `mlp_ratio` and SwiGLU's rounding as `Dinov2SwiGLUFFN`), else from the tensors' shapes (heads: D / 64, as
every DINOv2), and the position embeddings are resampled as the checkpoint's class does (`models.dinov2`).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from flax import nnx
from safetensors import SafetensorError

from diffusion_jax.convert import mapping
from diffusion_jax.convert.mapping import Rule
from diffusion_jax.convert.source import TensorSource, open_source
from diffusion_jax.errors import ConfigError
from diffusion_jax.models.dinov2 import DINOv2

LAYER = "encoder.layer.{0}"
QKV = tuple(f"{LAYER}.attention.attention.{x}" for x in ("query", "key", "value"))
RULES = [
    Rule("patch_embed/kernel", "embeddings.patch_embeddings.projection.weight", "conv"),
    Rule("patch_embed/bias", "embeddings.patch_embeddings.projection.bias"),
    Rule("cls_token", "embeddings.cls_token"),
    Rule("pos_embed", "embeddings.position_embeddings"),
    Rule("register_tokens", "embeddings.register_tokens"),
    Rule(r"blocks/(\d+)/norm([12])/scale", f"{LAYER}.norm{{1}}.weight"),
    Rule(r"blocks/(\d+)/norm([12])/bias", f"{LAYER}.norm{{1}}.bias"),
    Rule(r"blocks/(\d+)/attn/qkv/kernel", tuple(f"{n}.weight" for n in QKV), "linear"),
    Rule(r"blocks/(\d+)/attn/qkv/bias", tuple(f"{n}.bias" for n in QKV)),
    Rule(r"blocks/(\d+)/attn/proj/kernel", f"{LAYER}.attention.output.dense.weight", "linear"),
    Rule(r"blocks/(\d+)/attn/proj/bias", f"{LAYER}.attention.output.dense.bias"),
    Rule(r"blocks/(\d+)/ls([12])/gamma", f"{LAYER}.layer_scale{{1}}.lambda1"),
    Rule(r"blocks/(\d+)/mlp/(\w+)/kernel", f"{LAYER}.mlp.{{1}}.weight", "linear"),
    Rule(r"blocks/(\d+)/mlp/(\w+)/bias", f"{LAYER}.mlp.{{1}}.bias"),
    Rule("norm/scale", "layernorm.weight"),
    Rule("norm/bias", "layernorm.bias"),
]
IGNORED = (r"embeddings\.mask_token",)
CLS = "embeddings.cls_token"
HEAD_DIM = 64  # every DINOv2 (S/B/L/g: 6, 12, 16, 24 heads); only read where there is no config.json
FIELD = "repa.encoder_path"


def open_checkpoint(path: str | Path, field: str = FIELD) -> TensorSource:
    """The tensors of a DINOv2 `model.safetensors` (or the Hugging Face folder holding it), with its folder's
    config.json as `config` (None without one); a ConfigError naming `field` for anything else."""
    path = Path(path).expanduser()
    file = path / "model.safetensors" if path.is_dir() else path
    if not path.exists():
        raise ConfigError(f"{field}: no file or folder at {path}")
    if file.suffix != ".safetensors" or not file.is_file():
        raise ConfigError(f"{field}: {path} is neither a .safetensors file nor a folder holding model.safetensors "
                          "(Hugging Face's facebook/dinov2-*)")
    try:
        source = open_source(file, field)
    except SafetensorError as e:
        raise ConfigError(f"{field}: {file} is not a readable safetensors file: {e}") from None
    config = file.parent / "config.json"
    source.config = json.loads(config.read_text()) if config.is_file() else None
    return source


def _shape(source: TensorSource, name: str, field: str) -> tuple[int, ...]:
    if name not in source:
        raise ConfigError(f"{field}: {source.describe} has no {name}; not a Hugging Face DINOv2 checkpoint")
    return source.shape(name)


def _side(value: int | list[int], name: str, field: str) -> int:
    """A square size from config.json (an int, or [h, w] with h = w)."""
    h, w = (value, value) if isinstance(value, int) else value
    if h != w:
        raise ConfigError(f"{field}: config.json's {name} is {value}; only square sizes are supported")
    return h


def model_config(source: TensorSource, field: str = FIELD) -> dict:
    """`DINOv2`'s arguments for `source`: from its config.json, else from its tensors' shapes."""
    config = source.config
    if config is None:
        registers = source.shape("embeddings.register_tokens")[1] if "embeddings.register_tokens" in source else 0
        d = _shape(source, CLS, field)[-1]
        if d % HEAD_DIM:
            raise ConfigError(f"{field}: {source.describe} has no config.json beside it, and its width {d} is not "
                              f"DINOv2's {HEAD_DIM} per head: place its config.json next to it")
        patch = _shape(source, "embeddings.patch_embeddings.projection.weight", field)
        swiglu = f"{LAYER.format(0)}.mlp.weights_out.weight" in source
        mlp = _shape(source, f"{LAYER.format(0)}.mlp.{'weights_out' if swiglu else 'fc2'}.weight", field)[1]
        depth = sum(bool(re.fullmatch(r"encoder\.layer\.\d+\.norm1\.weight", n)) for n in source)
        grid = math.isqrt(_shape(source, "embeddings.position_embeddings", field)[1] - 1)
        return dict(hidden_size=d, depth=depth, num_heads=d // HEAD_DIM, mlp_hidden=mlp, patch_size=patch[-1],
                    image_size=grid * patch[-1], num_register_tokens=registers, swiglu=swiglu,
                    antialias=registers > 0, in_channels=patch[1])
    if config.get("hidden_act", "gelu") != "gelu":
        raise ConfigError(f"{field}: config.json's hidden_act is {config['hidden_act']!r}; DINOv2's MLP is 'gelu'")
    if not config.get("qkv_bias", True):
        raise ConfigError(f"{field}: config.json's qkv_bias is false; every DINOv2 has qkv biases")
    d, swiglu = config["hidden_size"], bool(config.get("use_swiglu_ffn", False))
    mlp = int(d * config.get("mlp_ratio", 4))
    return dict(hidden_size=d, depth=config["num_hidden_layers"], num_heads=config["num_attention_heads"],
                mlp_hidden=(int(mlp * 2 / 3) + 7) // 8 * 8 if swiglu else mlp,
                patch_size=_side(config.get("patch_size", 14), "patch_size", field),
                image_size=_side(config.get("image_size", 518), "image_size", field),
                num_register_tokens=config.get("num_register_tokens", 0), swiglu=swiglu,
                antialias=config.get("model_type") == "dinov2_with_registers",
                layer_norm_eps=config.get("layer_norm_eps", 1e-6),
                in_channels=config.get("num_channels", 3))


def width(path: str | Path, field: str = FIELD) -> int:
    """D of the checkpoint at `path`, from config.json or the CLS token's shape (no weight is read)."""
    source = open_checkpoint(path, field)
    return source.config["hidden_size"] if source.config else _shape(source, CLS, field)[-1]


def load(path: str | Path, field: str = FIELD) -> DINOv2:
    """The DINOv2 at `path` with its weights; a missing, unused or misshapen tensor is a one-line ConfigError
    naming it (`mapping.convert`)."""
    source = open_checkpoint(path, field)
    kwargs = model_config(source, field)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: DINOv2(**kwargs, rngs=nnx.Rngs(0))))
    params, _ = mapping.convert(RULES, abstract, source, IGNORED, field=field)
    return nnx.merge(graphdef, params)
