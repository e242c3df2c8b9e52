"""diffusers' `AutoencoderKL` (stabilityai/sd-vae-ft-ema, sd-vae-ft-mse, Stable Diffusion's `vae`) -> the
`autoencoder` of our 'autoencoder_kl' (`models.FirstStage`).

Our `models.autoencoder.AutoencoderKL` is LDM's KL autoencoder built with diffusers' attribute names, so
the mapping is one name per tensor, with NNX leaf names (`kernel`, `scale`) and layouts:

    encoder.conv_in, .conv_norm_out, .conv_out            encoder/conv_in, conv_norm_out, conv_out
    encoder.down_blocks.i.resnets.j                       encoder/down_blocks/i/resnets/j  (norm1, conv1,
                                                          norm2, conv2, conv_shortcut)
    encoder.down_blocks.i.downsamplers.0.conv             encoder/down_blocks/i/downsamplers/0/conv
    {encoder,decoder}.mid_block.resnets.{0,1}             {encoder,decoder}/mid_block/resnets/{0,1}
    {encoder,decoder}.mid_block.attentions.0              .../attentions/0  (group_norm; to_q, to_k, to_v,
        to_q, to_k, to_v, to_out.0  (current diffusers)   to_out/0: Dense layers, PyTorch [C, C] transposed)
        query, key, value, proj_attn  (older diffusers)
    decoder.up_blocks.i.resnets.j, .upsamplers.0.conv     decoder/up_blocks/i/...
    quant_conv, post_quant_conv                           quant_conv, post_quant_conv  (1x1 convs)

Which attention names apply follows the checkpoint's own tensors (`source_options`): files saved by early
diffusers, the sd-vae-ft-* releases among them, use `query/key/value/proj_attn`, which diffusers itself
renames when it loads them. Original LDM / CompVis `.ckpt` files (`encoder.down.0.block.0`, `mid.attn_1.q`
as [C, C, 1, 1] convs, the LPIPS and discriminator weights under `loss.`) are not mapped.

Only the autoencoder is in such a checkpoint, so the rules are those of the bare `AutoencoderKL` and
`TARGET` names the subtree of our model they fill: the importer plans and converts that subtree alone and
takes the rest (the patch discriminator) from the initialiser, as a run from scratch would draw it. The
alternative, rules over the whole `FirstStage` with the discriminator marked "initialise", would make the
mapping module know about initialisers; a subtree keeps `mapping` a pure name/layout table and lets the same
rules fill a bare `AutoencoderKL`.

The computation is diffusers': GroupNorm eps 1e-6 everywhere (resnets, attention, conv_norm_out), one
attention head of width C with scale 1/sqrt(C) and a residual connection, downsampling by a (0, 1, 0, 1)
zero pad then a stride-2 3x3 conv, nearest x2 upsampling then a 3x3 conv, and the posterior's moments split
(mean, logvar) on the channel axis with logvar clipped to [-30, 20]. `model_config` reads our fields from a
config.json and refuses what our model does not compute; `scaling_factor` is the latent scale s of
z = s * E(x) the checkpoint was published with, for a latent diffusion run's `latent.scale_factor`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

from diffusion_jax.convert.mapping import Rule
from diffusion_jax.errors import ConfigError

TARGET = "autoencoder"  # the subtree of FirstStage's parameters these rules fill; the discriminator is initialised
IGNORED: tuple[str, ...] = ()  # an AutoencoderKL state dict holds parameters only

# (our leaf, diffusers' leaf, layout) of each kind of layer
NORM = [("scale", "weight", "copy"), ("bias", "bias", "copy")]
CONV = [("kernel", "weight", "conv"), ("bias", "bias", "copy")]  # 3x3 and 1x1 alike: ours are all nnx.Conv
LINEAR = [("kernel", "weight", "linear"), ("bias", "bias", "copy")]
RESNET = [("norm1", NORM), ("conv1", CONV), ("norm2", NORM), ("conv2", CONV), ("conv_shortcut", CONV)]
ATTENTION_NAMES = {  # our attention's layers -> the checkpoint's, by diffusers generation
    "current": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out/0": "to_out.0"},
    "legacy": {"to_q": "query", "to_k": "key", "to_v": "value", "to_out/0": "proj_attn"},
}
CONVS = [  # (our layer regex, diffusers' layer template)
    (r"(encoder|decoder)/conv_in", "{0}.conv_in"), (r"(encoder|decoder)/conv_out", "{0}.conv_out"),
    (r"encoder/down_blocks/(\d+)/downsamplers/0/conv", "encoder.down_blocks.{0}.downsamplers.0.conv"),
    (r"decoder/up_blocks/(\d+)/upsamplers/0/conv", "decoder.up_blocks.{0}.upsamplers.0.conv"),
    ("quant_conv", "quant_conv"), ("post_quant_conv", "post_quant_conv"),
]
RESNETS = [
    (r"encoder/down_blocks/(\d+)/resnets/(\d+)", "encoder.down_blocks.{0}.resnets.{1}"),
    (r"decoder/up_blocks/(\d+)/resnets/(\d+)", "decoder.up_blocks.{0}.resnets.{1}"),
    (r"(encoder|decoder)/mid_block/resnets/(\d+)", "{0}.mid_block.resnets.{1}"),
]
MID_ATTENTION = (r"(encoder|decoder)/mid_block/attentions/0", "{0}.mid_block.attentions.0")


def _layer(ours: str, theirs: str, leaves: list[tuple[str, str, str]]) -> list[Rule]:
    """Rules for one layer: `ours` a regex of its path, `theirs` the template of its state-dict prefix."""
    return [Rule(f"{ours}/{our_leaf}", f"{theirs}.{their_leaf}", layout) for our_leaf, their_leaf, layout in leaves]


def rules(attention_names: str = "current") -> list[Rule]:
    """The mapping of the `AutoencoderKL` subtree; `attention_names` 'current' (to_q, ..., to_out.0) or 'legacy'
    (query, key, value, proj_attn): `source_options` picks it from the checkpoint."""
    table = [rule for ours, theirs in CONVS for rule in _layer(ours, theirs, CONV)]
    table += _layer(r"(encoder|decoder)/conv_norm_out", "{0}.conv_norm_out", NORM)
    for block, prefix in RESNETS:
        table += [rule for layer, leaves in RESNET for rule in _layer(f"{block}/{layer}", f"{prefix}.{layer}", leaves)]
    block, prefix = MID_ATTENTION
    table += _layer(f"{block}/group_norm", f"{prefix}.group_norm", NORM)
    for ours, theirs in ATTENTION_NAMES[attention_names].items():
        table += _layer(f"{block}/{ours}", f"{prefix}.{theirs}", LINEAR)
    return table


def rule_options(diffusers: dict) -> dict:
    """`rules`' options from a config.json: none (the attention names follow the tensors, `source_options`)."""
    return {}


def source_options(names: Sequence[str]) -> dict:
    """`rules`' options from the checkpoint's tensor names: the legacy attention names where it has them."""
    legacy = any(re.search(r"\.attentions\.0\.query\.weight$", name) for name in names)
    return {"attention_names": "legacy" if legacy else "current"}


# diffusers' AutoencoderKL defaults, for a config.json that leaves a field out
DEFAULTS = {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"],
            "up_block_types": ["UpDecoderBlock2D"], "block_out_channels": [64], "layers_per_block": 1,
            "latent_channels": 4, "norm_num_groups": 32, "mid_block_add_attention": True}
SCALING_FACTOR = 0.18215  # diffusers' default scaling_factor, Stable Diffusion's (LDM Appendix D.1)
# config.json fields whose value our AutoencoderKL computes, and what it must be (None: absent or null).
# force_upcast (fp16 inference) and sample_size (tiling) change nothing computed here; shift_factor,
# latents_mean and latents_std would shift the latents, which a latent run's `latent.scale_factor` cannot.
FIXED = {"act_fn": "silu", "use_quant_conv": True, "use_post_quant_conv": True, "shift_factor": None,
         "latents_mean": None, "latents_std": None}
BLOCK_TYPES = {"down_block_types": "DownEncoderBlock2D", "up_block_types": "UpDecoderBlock2D"}


def model_config(diffusers: dict) -> dict:
    """Our `model.*` fields (and `in_channels`, the data's channels) of a diffusers AutoencoderKL config.json;
    what our AutoencoderKL cannot reproduce is a one-line ConfigError naming the config.json field."""
    name = diffusers.get("_class_name", "AutoencoderKL")
    if name != "AutoencoderKL":
        raise ConfigError(f"model.pretrained: its config.json is a {name}; model.name='autoencoder_kl' imports an "
                          "AutoencoderKL")
    for field, wanted in FIXED.items():
        value = diffusers.get(field, wanted)
        if value != wanted:
            raise ConfigError(f"model.pretrained: its config.json has {field}={value!r}; our AutoencoderKL computes "
                              f"{field}={wanted!r}")
    get = functools.partial(_field, diffusers)
    widths = tuple(get("block_out_channels"))
    for field, kind in BLOCK_TYPES.items():
        types = list(get(field))
        if types != [kind] * len(widths):
            raise ConfigError(f"model.pretrained: its config.json has {field}={types}; our AutoencoderKL has "
                              f"{len(widths)} {kind} (one per block_out_channels entry)")
    if get("out_channels") != get("in_channels"):
        raise ConfigError(f"model.pretrained: its config.json has out_channels={get('out_channels')} and "
                          f"in_channels={get('in_channels')}; our AutoencoderKL reconstructs its input's channels")
    return {
        "block_out_channels": widths,
        "layers_per_block": get("layers_per_block"),
        "latent_channels": get("latent_channels"),
        "norm_num_groups": get("norm_num_groups"),
        "mid_attention": bool(get("mid_block_add_attention")),
        "in_channels": get("in_channels"),
    }


def _field(diffusers: dict, field: str) -> object:
    """A config.json's `field`, or diffusers' default for it."""
    return diffusers.get(field, DEFAULTS[field])


def scaling_factor(diffusers: dict) -> float:
    """The latent scale s of z = s * E(x) a config.json gives (diffusers' default 0.18215 where it has none,
    as in sd-vae-ft-*'s): a latent diffusion run's `latent.scale_factor` for this autoencoder."""
    return float(diffusers.get("scaling_factor", SCALING_FACTOR))
