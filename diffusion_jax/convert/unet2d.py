"""diffusers' `UNet2DModel` (google/ddpm-cifar10-32, ddpm-celebahq-256, ...) -> our 'unet'.

The two networks are the same DDPM U-Net (Ho et al. 2020): the mapping is one name per tensor,

    time_embedding.linear_{1,2}            cond/time/dense{0,1}
    down_blocks.i.resnets.j                down/i/stages/j/res   (norm1, conv1, time_emb_proj -> emb_proj,
                                                                  norm2, conv2, conv_shortcut -> skip)
    down_blocks.i.attentions.j             down/i/stages/j/attn  (group_norm -> norm, to_q/k/v -> qkv,
                                                                  to_out.0 -> proj_out)
    down_blocks.i.downsamplers.0.conv      down/i/resample/conv
    mid_block.resnets.{0,1}, attentions.0  mid_block{1,2}, mid_attn
    up_blocks.i.*, upsamplers.0.conv       up/i/*, up/i/resample/conv
    conv_in, conv_norm_out, conv_out       conv_in, norm_out, conv_out

and `model_config` reads our model's fields from the diffusers `config.json`, refusing (one line each)
what our U-Net does not compute the same way. Ho et al.'s timestep embedding is [sin, cos] with the
frequencies divided by half - 1 (`flip_sin_to_cos=False`, `freq_shift=1`): the shift is our U-Net's
`time_freq_shift`, the order a permutation of the first time layer's input rows.
"""

from __future__ import annotations

import numpy as np

from diffusion_jax.convert.mapping import Rule
from diffusion_jax.errors import ConfigError

RESNET = [
    ("norm1/scale", "norm1.weight", "copy"), ("norm1/bias", "norm1.bias", "copy"),
    ("conv1/kernel", "conv1.weight", "conv"), ("conv1/bias", "conv1.bias", "copy"),
    ("emb_proj/kernel", "time_emb_proj.weight", "linear"), ("emb_proj/bias", "time_emb_proj.bias", "copy"),
    ("norm2/scale", "norm2.weight", "copy"), ("norm2/bias", "norm2.bias", "copy"),
    ("conv2/kernel", "conv2.weight", "conv"), ("conv2/bias", "conv2.bias", "copy"),
    ("skip/kernel", "conv_shortcut.weight", "conv1x1"), ("skip/bias", "conv_shortcut.bias", "copy"),
]
ATTENTION = [
    ("norm/scale", ("group_norm.weight",), "copy"), ("norm/bias", ("group_norm.bias",), "copy"),
    ("qkv/kernel", ("to_q.weight", "to_k.weight", "to_v.weight"), "linear"),
    ("qkv/bias", ("to_q.bias", "to_k.bias", "to_v.bias"), "copy"),
    ("proj_out/kernel", ("to_out.0.weight",), "linear"), ("proj_out/bias", ("to_out.0.bias",), "copy"),
]
IGNORED: tuple[str, ...] = ()  # a UNet2DModel state dict holds parameters only


def _block_rules(ours: str, theirs: str, table: list) -> list[Rule]:
    """Rules for one kind of block: `ours` / `theirs` are the path prefixes (regex, template)."""
    rules = []
    for our_leaf, their_leaf, layout in table:
        names = (their_leaf,) if isinstance(their_leaf, str) else their_leaf
        rules.append(Rule(f"{ours}/{our_leaf}", tuple(f"{theirs}.{n}" for n in names), layout))
    return rules


def rules(flip_sin_to_cos: bool = False) -> list[Rule]:
    """The mapping; `flip_sin_to_cos` is the checkpoint's (False for Ho et al.'s own weights)."""
    time_layout = "linear" if flip_sin_to_cos else "linear_swap_input_halves"
    table = [
        Rule(r"cond/time/dense0/kernel", "time_embedding.linear_1.weight", time_layout),
        Rule(r"cond/time/dense0/bias", "time_embedding.linear_1.bias"),
        Rule(r"cond/time/dense1/kernel", "time_embedding.linear_2.weight", "linear"),
        Rule(r"cond/time/dense1/bias", "time_embedding.linear_2.bias"),
        Rule(r"conv_in/kernel", "conv_in.weight", "conv"), Rule(r"conv_in/bias", "conv_in.bias"),
        Rule(r"norm_out/scale", "conv_norm_out.weight"), Rule(r"norm_out/bias", "conv_norm_out.bias"),
        Rule(r"conv_out/kernel", "conv_out.weight", "conv"), Rule(r"conv_out/bias", "conv_out.bias"),
    ]
    for path in ("down", "up"):
        table += _block_rules(rf"{path}/(\d+)/stages/(\d+)/res", f"{path}_blocks.{{0}}.resnets.{{1}}", RESNET)
        table += _block_rules(rf"{path}/(\d+)/stages/(\d+)/attn", f"{path}_blocks.{{0}}.attentions.{{1}}", ATTENTION)
        sampler = "downsamplers" if path == "down" else "upsamplers"
        table += [Rule(rf"{path}/(\d+)/resample/conv/kernel", f"{path}_blocks.{{0}}.{sampler}.0.conv.weight", "conv"),
                  Rule(rf"{path}/(\d+)/resample/conv/bias", f"{path}_blocks.{{0}}.{sampler}.0.conv.bias")]
    table += _block_rules("mid_block1", "mid_block.resnets.0", RESNET)
    table += _block_rules("mid_block2", "mid_block.resnets.1", RESNET)
    table += _block_rules("mid_attn", "mid_block.attentions.0", ATTENTION)
    return table


def rule_options(diffusers: dict) -> dict:
    """`rules`' options from a config.json ({} without one: diffusers' defaults, which are ours)."""
    return {"flip_sin_to_cos": bool(diffusers.get("flip_sin_to_cos", True))}


# config.json fields whose value our U-Net computes, and what it must be (None: absent or null)
FIXED = {
    "act_fn": "silu", "norm_eps": 1e-6, "downsample_padding": 0, "resnet_time_scale_shift": "default",
    "time_embedding_type": "positional", "center_input_sample": False, "mid_block_scale_factor": 1,
    "class_embed_type": None, "num_class_embeds": None, "add_attention": True, "norm_num_groups": 32,
    "downsample_type": "conv", "upsample_type": "conv", "attn_norm_num_groups": None,
}


def model_config(diffusers: dict) -> dict:
    """Our `model.*` fields (and `time_freq_shift`) of a diffusers UNet2DModel config.json; what our U-Net
    cannot reproduce is a one-line ConfigError naming the config.json field."""
    name = diffusers.get("_class_name", "UNet2DModel")
    if name != "UNet2DModel":
        raise ConfigError(f"model.pretrained: its config.json is a {name}; model.name='unet' imports a UNet2DModel")
    for field, wanted in FIXED.items():
        value = diffusers.get(field, wanted)
        if value != wanted and not (isinstance(wanted, float) and np.isclose(value, wanted)):
            raise ConfigError(f"model.pretrained: its config.json has {field}={value!r}; our U-Net computes "
                              f"{field}={wanted!r}")
    widths = block_widths(diffusers)
    ch = widths[0]
    attending = attention_levels(diffusers, "AttnDownBlock2D")
    size = sample_size(diffusers)
    head_dim = diffusers.get("attention_head_dim")
    attn_widths = {widths[i] for i in attending} | {widths[-1]}
    if head_dim is not None and any(w % head_dim for w in attn_widths):
        raise ConfigError(f"model.pretrained: attention_head_dim={head_dim} does not divide the widths {attn_widths}")
    in_channels, out_channels = channels(diffusers, 3)
    return {
        "ch": ch,
        "ch_mult": tuple(w // ch for w in widths),
        "num_res_blocks": diffusers["layers_per_block"],
        "attn_resolutions": tuple(size // 2**i for i in attending),
        "num_heads": 1,  # one head, unless num_head_channels sets the width of each
        "num_head_channels": head_dim,
        "learn_sigma": out_channels == 2 * in_channels,
        "time_freq_shift": float(diffusers.get("freq_shift", 0)),
        "image_size": size,
        "in_channels": in_channels,
    }


# What a UNet2DModel's and a UNet2DConditionModel's config.json share (`unet2d_condition` reads them too).


def block_widths(diffusers: dict) -> list[int]:
    """`block_out_channels`, each a multiple of the first (our `ch` times `ch_mult`)."""
    widths = list(diffusers["block_out_channels"])
    if any(w % widths[0] for w in widths):
        raise ConfigError(f"model.pretrained: block_out_channels {widths} are not multiples of the first")
    return widths


def attention_levels(diffusers: dict, attending: str) -> list[int]:
    """The levels whose down block is of type `attending`, the others plain `DownBlock2D`s and the up path their
    mirror (our U-Net's layout)."""
    down, up = list(diffusers["down_block_types"]), list(diffusers["up_block_types"])
    unknown = sorted(set(down) - {"DownBlock2D", attending})
    if unknown:
        raise ConfigError(f"model.pretrained: down_block_types {unknown} have no counterpart in our U-Net")
    if up != [t.replace("Down", "Up") for t in reversed(down)]:
        raise ConfigError(f"model.pretrained: up_block_types {up} do not mirror down_block_types {down}")
    return [i for i, t in enumerate(down) if t == attending]


def sample_size(diffusers: dict) -> int:
    """`sample_size` (an int, or the first of a pair), which sets data.image_size and the attention resolutions."""
    size = diffusers.get("sample_size")
    if size is None:
        raise ConfigError("model.pretrained: its config.json has no sample_size, which sets data.image_size and "
                          "model.attn_resolutions")
    return size[0] if isinstance(size, list | tuple) else size


def channels(diffusers: dict, default: int) -> tuple[int, int]:
    """(in_channels, out_channels): the output the input's channels, or twice them (a learned variance)."""
    in_channels, out_channels = diffusers.get("in_channels", default), diffusers.get("out_channels", default)
    if out_channels not in (in_channels, 2 * in_channels):
        raise ConfigError(f"model.pretrained: out_channels={out_channels} with in_channels={in_channels}")
    return in_channels, out_channels
