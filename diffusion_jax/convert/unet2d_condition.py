"""diffusers' `UNet2DConditionModel` of Stable Diffusion 1.x (CompVis/stable-diffusion-v1-4,
runwayml/stable-diffusion-v1-5: their `unet/`) -> our cross-attention 'unet' (`model.context_dim`).

SD 1.x's U-Net is LDM's (Rombach et al. 2022, arXiv 2112.10752, §3.3): the DDPM U-Net's
tensors, named as in a UNet2DModel (`convert.unet2d`'s rules, its attention rules left out), with every
attention block LDM's SpatialTransformer, whose parameter paths here are diffusers' names (`models.attention`):

    {down,up}_blocks.i.attentions.j        {down,up}/i/stages/j/attn
    mid_block.attentions.0                 mid_attn
      .norm, .proj_in, .proj_out             norm, proj_in, proj_out      (1x1 convs: 'conv' layout)
      .transformer_blocks.k.{norm1,2,3}      transformer_blocks/k/norm{1,2,3}
      .transformer_blocks.k.attn{1,2}.to_{q,k,v}, .to_out.0
      .transformer_blocks.k.ff.net.{0.proj,2}   (Linear layers: 'linear' layout)

The down path's CrossAttnDownBlock2D levels are our `attn_resolutions` (SD 1.x: the first three, 64, 32, 16
at 64x64 latents; the last is a DownBlock2D), the up path mirrors them, and the middle block is
resnet-transformer-resnet as ours. The up blocks hold their upsampler (`up_blocks.i.upsamplers.0.conv`),
ours sits beside the stages (`up/i/resample/conv`): the same place in the computation.

What our U-Net computes through options (`model_config` sets them): the ResNets' and the output's GroupNorm
eps (`norm_eps`, 1e-5 in SD, PyTorch's default), the downsampling conv's symmetric padding of 1
(`downsample_padding=1`; ours pads SAME otherwise, 0 before and 1 after), the [cos, sin] timestep embedding
without frequency shift (`flip_sin_to_cos=True`, `freq_shift=0`: ours). SD's `attention_head_dim=8` is the
number of HEADS (diffusers keeps the historical name: `num_attention_heads = attention_head_dim`), each
channels / 8 wide: our `num_heads=8`. `upcast_attention` only changes the precision of fp16 attention
scores, so it is accepted either way: an fp32 import computes the same.
"""

from __future__ import annotations

import inspect
import re

from diffusion_jax.convert import unet2d
from diffusion_jax.convert.mapping import Rule
from diffusion_jax.errors import ConfigError
from diffusion_jax.models.unet import UNet

IGNORED: tuple[str, ...] = ()  # a UNet2DConditionModel state dict holds parameters only


def _transformer_rules(ours: str, theirs: str) -> list[Rule]:
    """A Transformer2DModel (1x1-conv projections, SD 1.x) at our regex `ours` from their template `theirs`:
    the parameter names are the same on both sides ('/' for '.'), kernels are PyTorch's weights."""
    tail = f"{{{re.compile(ours).groups}}}"  # the template field of the group after `ours`' own
    linear = r"transformer_blocks/\d+/(?:attn[12]/to_(?:q|k|v|out/0)|ff/net/(?:0/proj|2))"
    return [
        Rule(rf"{ours}/(proj_in|proj_out)/kernel", f"{theirs}.{tail}.weight", "conv"),
        Rule(rf"{ours}/({linear})/kernel", f"{theirs}.{tail}.weight", "linear"),
        Rule(rf"{ours}/(norm|transformer_blocks/\d+/norm[123])/scale", f"{theirs}.{tail}.weight"),
        Rule(rf"{ours}/(.+)/bias", f"{theirs}.{tail}.bias"),
    ]


def rules(flip_sin_to_cos: bool = True) -> list[Rule]:
    """The mapping: `unet2d`'s for everything but attention, then the SpatialTransformers; `flip_sin_to_cos` is
    the checkpoint's (True in SD 1.x)."""
    table = [rule for rule in unet2d.rules(flip_sin_to_cos) if "attn" not in rule.target]
    table += _transformer_rules(r"(down|up)/(\d+)/stages/(\d+)/attn", "{0}_blocks.{1}.attentions.{2}")
    table += _transformer_rules(r"mid_attn", "mid_block.attentions.0")
    return table


def rule_options(diffusers: dict) -> dict:
    """`rules`' options from a config.json ({} without one: diffusers' default, SD's [cos, sin])."""
    return {"flip_sin_to_cos": bool(diffusers.get("flip_sin_to_cos", True))}


def model_defaults(name: str) -> dict:
    """The fields a config may leave to our U-Net (its constructor's defaults), for `convert.check_against`."""
    return {k: p.default for k, p in inspect.signature(UNet.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


# config.json fields our U-Net computes one way only, and the values that mean it (an absent field: diffusers'
# default, which is among them); a per-level list of one repeated value counts as that value
FIXED: dict[str, tuple] = {
    "act_fn": ("silu",), "norm_num_groups": (32,), "resnet_time_scale_shift": ("default",),
    "time_embedding_type": ("positional",), "center_input_sample": (False,), "mid_block_scale_factor": (1,),
    "mid_block_type": ("UNetMidBlock2DCrossAttn",), "class_embed_type": (None,), "num_class_embeds": (None,),
    "addition_embed_type": (None,), "time_cond_proj_dim": (None,), "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,), "only_cross_attention": (False,), "mid_block_only_cross_attention": (None, False),
    "dual_cross_attention": (False,), "use_linear_projection": (False,), "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1,), "time_embedding_dim": (None,), "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,), "conv_in_kernel": (3,), "conv_out_kernel": (3,), "attention_type": ("default",),
    "class_embeddings_concat": (False,), "cross_attention_norm": (None,), "num_attention_heads": (None,),
    "reverse_transformer_layers_per_block": (None,),
}


def _one(value: object) -> object:
    """A per-level list of one repeated value as that value; anything else as is."""
    return value[0] if isinstance(value, list | tuple) and value and all(v == value[0] for v in value) else value


def _check_fixed(diffusers: dict) -> None:
    """A one-line ConfigError for the first `FIXED` field whose value our U-Net does not compute."""
    for field, accepted in FIXED.items():
        value = _one(diffusers.get(field, accepted[0]))
        if value not in accepted:
            raise ConfigError(f"model.pretrained: its config.json has {field}={value!r}; our U-Net computes "
                              f"{field}={accepted[0]!r}")


# diffusers' defaults of the int-or-per-level fields `model_config` reads
PER_LEVEL_DEFAULTS = {"layers_per_block": 2, "attention_head_dim": 8, "cross_attention_dim": 1280,
                      "transformer_layers_per_block": 1}


def _per_level(diffusers: dict, field: str, levels: list[int]) -> object:
    """The one value of an int-or-per-level field on the levels `levels` (our U-Net has one for all)."""
    value = diffusers.get(field, PER_LEVEL_DEFAULTS[field])
    values = {value[i] for i in levels} if isinstance(value, list | tuple) else {value}
    if len(values) != 1:
        raise ConfigError(f"model.pretrained: its config.json has {field}={value!r}; our U-Net uses one value on "
                          f"all those levels")
    return values.pop()


def _downsample_padding(diffusers: dict) -> int | None:
    """Our `downsample_padding` of diffusers' (0: pad 0 before, 1 after = our SAME, None; 1: 1 on every side)."""
    padding = diffusers.get("downsample_padding", 1)
    if padding not in (0, 1):
        raise ConfigError(f"model.pretrained: its config.json has downsample_padding={padding!r}; our U-Net "
                          f"computes 0 (SAME) or 1")
    return None if padding == 0 else 1


def model_config(diffusers: dict) -> dict:
    """Our `model.*` fields (and the data's size and channels) of an SD 1.x-style UNet2DConditionModel
    config.json; what our U-Net cannot reproduce is a one-line ConfigError naming the config.json field."""
    name = diffusers.get("_class_name", "UNet2DConditionModel")
    if name != "UNet2DConditionModel":
        raise ConfigError(f"model.pretrained: its config.json is a {name}, not a UNet2DConditionModel")
    _check_fixed(diffusers)
    widths = unet2d.block_widths(diffusers)
    ch = widths[0]
    attending = unet2d.attention_levels(diffusers, "CrossAttnDownBlock2D")
    with_middle = [*attending, len(widths) - 1]  # the middle block attends at the last level's width
    size = unet2d.sample_size(diffusers)
    in_channels, out_channels = unet2d.channels(diffusers, 4)
    return {
        "ch": ch,
        "ch_mult": tuple(w // ch for w in widths),
        "num_res_blocks": _per_level(diffusers, "layers_per_block", list(range(len(widths)))),
        "attn_resolutions": tuple(size // 2**i for i in attending),
        "num_heads": _per_level(diffusers, "attention_head_dim", with_middle),  # heads, despite the name
        "num_head_channels": None,
        "context_dim": _per_level(diffusers, "cross_attention_dim", with_middle),
        "transformer_depth": _per_level(diffusers, "transformer_layers_per_block", with_middle),
        "learn_sigma": out_channels == 2 * in_channels,
        "time_freq_shift": float(diffusers.get("freq_shift", 0)),
        "norm_eps": float(diffusers.get("norm_eps", 1e-5)),
        "downsample_padding": _downsample_padding(diffusers),
        "image_size": size,
        "in_channels": in_channels,
    }


def is_conditional(config_json: dict | None, names: list[str]) -> bool:
    """Whether a 'unet' checkpoint is a UNet2DConditionModel: its config.json's `_class_name` says so or,
    without one, its tensors hold cross-attention (`attn2`, which a UNet2DModel never has)."""
    if config_json is not None and "_class_name" in config_json:
        return config_json["_class_name"] == "UNet2DConditionModel"
    return any(".attn2." in n for n in names)

