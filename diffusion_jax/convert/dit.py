"""DiT checkpoints -> our 'dit' (and 'DiT-XL/2' etc.): facebookresearch/DiT's reference state dict
(`DiT-XL-2-256x256.pt`) or diffusers' `DiTTransformer2DModel` (facebook/DiT-XL-2-256's `transformer/`).

Both hold the network of `models.dit`, one name per tensor (`TABLE`):

    ours                       reference (`models.py`)           diffusers (`transformer_blocks.i` = tb.i)
    x_embedder                 x_embedder.proj                   pos_embed.proj
    cond/time/dense{0,1}       t_embedder.mlp.{0,2}              tb.0.norm1.emb.timestep_embedder.linear_{1,2}
    cond/label/embed           y_embedder.embedding_table        tb.0.norm1.emb.class_embedder.embedding_table
    blocks/i/adaln_modulation  blocks.i.adaLN_modulation.1       tb.i.norm1.linear
    blocks/i/attn/qkv          blocks.i.attn.qkv                 tb.i.attn1.to_{q,k,v} (concatenated)
    blocks/i/attn/proj         blocks.i.attn.proj                tb.i.attn1.to_out.0
    blocks/i/mlp/fc{1,2}       blocks.i.mlp.fc{1,2}              tb.i.ff.net.{0.proj,2}
    final_layer/adaln_modulation  final_layer.adaLN_modulation.1  proj_out_1
    final_layer/linear         final_layer.linear                proj_out_2

Every order agrees: adaLN's chunks (shift, scale, gate of the attention, then of the MLP; the final layer's
shift, scale), the [cos, sin] timestep embedding of 256 frequencies, timm's fused qkv (3, heads, head_dim on
the output axis, as to_q, to_k, to_v concatenated), the (row, column, channel) features of a patch. The
reference's `pos_embed` is its fixed sin-cos table, which our DiT computes: ignored. `source_options` tells
the layouts apart by their patch embedding's name.

diffusers gives every block its own copy of the timestep and class embedders (`norm1.emb`), and its final
layer reads block 0's; diffusers' conversion script (`scripts/convert_dit_to_diffusers.py`) writes the
reference's single embedder into every copy. Ours comes from block 0's copy; `check_source` reads the
others before the weights and refuses a checkpoint where one differs (a DiT trained in diffusers, whose
copies drift apart, is not a network ours computes), so they are ignored only once shown equal.

diffusers' DiT computes two things unlike the reference, and an import runs the reference's network, the
one the checkpoints were trained as: its timestep embedding divides the frequency exponents by half - 1
(`Timesteps(downscale_freq_shift=1)` in `CombinedTimestepLabelEmbeddings`; the reference divides by half),
and its MLP LayerNorm uses the config's `norm_eps`, 1e-5 by default and so in facebook/DiT-XL-2-256, where the
reference's is 1e-6 as its other LayerNorms. `model_config` accepts either eps for that reason.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Sequence

import numpy as np

from diffusion_jax.convert.mapping import Rule
from diffusion_jax.convert.source import TensorSource
from diffusion_jax.errors import ConfigError
from diffusion_jax.models.dit import DIT_SIZES, VARIANTS, DiT

EMBEDDER = "transformer_blocks.0.norm1.emb"  # diffusers' embedders: block 0's copy (see the module docstring)
BLOCK = "transformer_blocks.{0}"
QKV = tuple(f"{BLOCK}.attn1.to_{x}" for x in "qkv")

# (our parameter: a regex of its path, the reference's tensor(s), diffusers' tensor(s), layout)
TABLE: list[tuple[str, str, str | tuple[str, ...], str]] = [
    ("x_embedder/kernel", "x_embedder.proj.weight", "pos_embed.proj.weight", "conv"),
    ("x_embedder/bias", "x_embedder.proj.bias", "pos_embed.proj.bias", "copy"),
    ("cond/time/dense0/kernel", "t_embedder.mlp.0.weight", f"{EMBEDDER}.timestep_embedder.linear_1.weight", "linear"),
    ("cond/time/dense0/bias", "t_embedder.mlp.0.bias", f"{EMBEDDER}.timestep_embedder.linear_1.bias", "copy"),
    ("cond/time/dense1/kernel", "t_embedder.mlp.2.weight", f"{EMBEDDER}.timestep_embedder.linear_2.weight", "linear"),
    ("cond/time/dense1/bias", "t_embedder.mlp.2.bias", f"{EMBEDDER}.timestep_embedder.linear_2.bias", "copy"),
    ("cond/label/embed/embedding", "y_embedder.embedding_table.weight",
     f"{EMBEDDER}.class_embedder.embedding_table.weight", "copy"),
    (r"blocks/(\d+)/adaln_modulation/kernel", "blocks.{0}.adaLN_modulation.1.weight", f"{BLOCK}.norm1.linear.weight",
     "linear"),
    (r"blocks/(\d+)/adaln_modulation/bias", "blocks.{0}.adaLN_modulation.1.bias", f"{BLOCK}.norm1.linear.bias", "copy"),
    (r"blocks/(\d+)/attn/qkv/kernel", "blocks.{0}.attn.qkv.weight", tuple(f"{n}.weight" for n in QKV), "linear"),
    (r"blocks/(\d+)/attn/qkv/bias", "blocks.{0}.attn.qkv.bias", tuple(f"{n}.bias" for n in QKV), "copy"),
    (r"blocks/(\d+)/attn/proj/kernel", "blocks.{0}.attn.proj.weight", f"{BLOCK}.attn1.to_out.0.weight", "linear"),
    (r"blocks/(\d+)/attn/proj/bias", "blocks.{0}.attn.proj.bias", f"{BLOCK}.attn1.to_out.0.bias", "copy"),
    (r"blocks/(\d+)/mlp/fc1/kernel", "blocks.{0}.mlp.fc1.weight", f"{BLOCK}.ff.net.0.proj.weight", "linear"),
    (r"blocks/(\d+)/mlp/fc1/bias", "blocks.{0}.mlp.fc1.bias", f"{BLOCK}.ff.net.0.proj.bias", "copy"),
    (r"blocks/(\d+)/mlp/fc2/kernel", "blocks.{0}.mlp.fc2.weight", f"{BLOCK}.ff.net.2.weight", "linear"),
    (r"blocks/(\d+)/mlp/fc2/bias", "blocks.{0}.mlp.fc2.bias", f"{BLOCK}.ff.net.2.bias", "copy"),
    ("final_layer/adaln_modulation/kernel", "final_layer.adaLN_modulation.1.weight", "proj_out_1.weight", "linear"),
    ("final_layer/adaln_modulation/bias", "final_layer.adaLN_modulation.1.bias", "proj_out_1.bias", "copy"),
    ("final_layer/linear/kernel", "final_layer.linear.weight", "proj_out_2.weight", "linear"),
    ("final_layer/linear/bias", "final_layer.linear.bias", "proj_out_2.bias", "copy"),
]
LAYOUT_MARKS = {"reference": "x_embedder.proj.weight", "diffusers": "pos_embed.proj.weight"}  # layout: its tensor
COPIES = r"transformer_blocks\.[1-9]\d*\.norm1\.emb\.(.+)"  # diffusers' embedder copies past block 0
# the reference's fixed position table, and those copies (checked equal to block 0's by `check_source`)
IGNORED: tuple[str, ...] = (r"pos_embed", COPIES)


def rules(layout: str) -> list[Rule]:
    """The mapping from `layout`, 'reference' (facebookresearch/DiT) or 'diffusers' (`DiTTransformer2DModel`)."""
    column = {"reference": 1, "diffusers": 2}[layout]
    return [Rule(row[0], row[column], row[3]) for row in TABLE]


def rule_options(diffusers: dict) -> dict:
    """No option comes from a config.json: the layout follows the tensor names (`source_options`)."""
    return {}


def source_options(names: Sequence[str]) -> dict:
    """`rules`' layout: 'reference' or 'diffusers', by the name of the patch embedding's weight."""
    for layout, mark in LAYOUT_MARKS.items():
        if mark in names:
            return {"layout": layout}
    raise ConfigError(f"model.pretrained: no DiT checkpoint: its tensors include neither "
                      f"{' nor '.join(LAYOUT_MARKS.values())}")


def check_source(source: TensorSource) -> None:
    """A ConfigError naming the first of diffusers' per-block embedder tensors that differs from block 0's (the
    reference's single embedder was copied into each: see the module docstring); nothing for the reference layout.

    Reads block 0's copy of one tensor, then every other block's copy of it, one at a time.
    """
    copies: dict[str, list[str]] = {}
    for name in source.names:
        match = re.fullmatch(COPIES, name)
        if match:
            copies.setdefault(match.group(1), []).append(name)
    for leaf, names in copies.items():
        first = source.get(f"{EMBEDDER}.{leaf}")
        for name in names:
            if not np.array_equal(source.get(name), first):
                raise ConfigError(f"model.pretrained: {name} differs from {EMBEDDER}.{leaf}; our DiT has one timestep "
                                  "and class embedder, as DiT's reference, so every block's copy must be block 0's")


def config_from_tensors(source: TensorSource) -> dict:
    """Our model fields (and the latents' size and channels) that a reference `.pt`'s shapes fix, since it has no
    config.json: its patch embedding [D, C, p, p], its `pos_embed` [1, (S / p)², D] (so DiT-XL/2-512's weights,
    whose parameters have the 256 model's shapes, are told apart), its class table [K + 1, D], its blocks and its
    final layer [p² C_out, D]; {} for the diffusers layout (its config.json is read instead). Heads cannot be read
    off the shapes."""
    if LAYOUT_MARKS["reference"] not in source or "pos_embed" not in source:
        return {}
    hidden, channels, patch, _ = source.shape(LAYOUT_MARKS["reference"])
    tokens = source.shape("pos_embed")[1]
    side = round(tokens**0.5)
    out_channels = source.shape("final_layer.linear.weight")[0] // patch**2
    return {
        "image_size": side * patch, "in_channels": channels, "patch_size": patch, "hidden_size": hidden,
        "depth": len({n.split(".")[1] for n in source.names if n.startswith("blocks.")}),
        "num_classes": source.shape("y_embedder.embedding_table.weight")[0] - 1,
        "learn_sigma": out_channels == 2 * channels,
    }


def model_defaults(name: str) -> dict:
    """The model fields that `model.name` decides when a config leaves them out: a variant's depth, hidden_size,
    num_heads and patch_size (Table 1), else `DiT`'s defaults."""
    defaults = {k: p.default for k, p in inspect.signature(DiT.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    if name in VARIANTS:
        size, patch = name.removeprefix("DiT-").split("/")
        defaults.update(zip(("depth", "hidden_size", "num_heads"), DIT_SIZES[size], strict=True),
                        patch_size=int(patch))
    return defaults


# config.json fields whose value our DiT computes, and what it must be (an absent field is diffusers' default,
# which is); the last four are those of a legacy `Transformer2DModel` config that a DiT leaves at their defaults
FIXED = {
    "norm_type": "ada_norm_zero", "activation_fn": "gelu-approximate", "attention_bias": True,
    "norm_elementwise_affine": False, "dropout": 0.0, "cross_attention_dim": None, "num_vector_embeds": None,
    "only_cross_attention": False, "double_self_attention": False,
}
NORM_EPS = (1e-5, 1e-6)  # diffusers' default for the MLP LayerNorm, which a converted checkpoint keeps, and DiT's
CLASS_NAMES = ("DiTTransformer2DModel", "Transformer2DModel")


def model_config(diffusers: dict) -> dict:
    """Our `model.*` fields (and the data's shape: the latents' size and channels) of a diffusers
    `DiTTransformer2DModel` config.json; what our DiT cannot reproduce is a one-line ConfigError naming the field."""
    name = diffusers.get("_class_name", "DiTTransformer2DModel")
    if name not in CLASS_NAMES or diffusers.get("patch_size") is None:
        raise ConfigError(f"model.pretrained: its config.json is a {name} with patch_size="
                          f"{diffusers.get('patch_size')!r}; model.name='dit' imports a DiTTransformer2DModel")
    for field, wanted in FIXED.items():
        value = diffusers.get(field, wanted)
        if value != wanted:
            raise ConfigError(f"model.pretrained: its config.json has {field}={value!r}; our DiT computes "
                              f"{field}={wanted!r}")
    eps = diffusers.get("norm_eps", NORM_EPS[0])
    if not any(np.isclose(eps, e) for e in NORM_EPS):
        raise ConfigError(f"model.pretrained: its config.json has norm_eps={eps!r}; our DiT computes norm_eps=1e-06")
    num_classes = diffusers.get("num_embeds_ada_norm")
    if num_classes is None:
        raise ConfigError("model.pretrained: its config.json has num_embeds_ada_norm=None; our DiT imports a "
                          "class-conditional DiT")
    in_channels = diffusers.get("in_channels", 4)
    out_channels = diffusers.get("out_channels") or in_channels
    if out_channels not in (in_channels, 2 * in_channels):
        raise ConfigError(f"model.pretrained: its config.json has out_channels={out_channels} with "
                          f"in_channels={in_channels}; our DiT predicts in_channels, or twice as many with learn_sigma")
    size = diffusers.get("sample_size", 32)
    heads = diffusers.get("num_attention_heads", 16)
    return {
        "patch_size": diffusers["patch_size"],
        "hidden_size": heads * diffusers.get("attention_head_dim", 72),
        "depth": diffusers.get("num_layers", 28),
        "num_heads": heads,
        "num_classes": num_classes,
        "learn_sigma": out_channels == 2 * in_channels,
        "image_size": size[0] if isinstance(size, list | tuple) else size,
        "in_channels": in_channels,
    }
