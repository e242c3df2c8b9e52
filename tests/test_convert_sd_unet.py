"""Weight import of Stable Diffusion 1.x's UNet2DConditionModel into our cross-attention U-Net
(`convert.unet2d_condition`): a tiny randomised diffusers model saved, imported and run on the same latents,
timesteps and context (a mismatch names the first block that diverges, `parity`), and SD 1.5's full-size
mapping checked abstractly against diffusers' parameter count."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from flax import nnx
from parity import first_divergence, randomised, relative_error, saved_and_imported, to_nhwc

from diffusion_jax import convert, models
from diffusion_jax.config import base_config
from diffusion_jax.convert import mapping, source, unet2d, unet2d_condition
from diffusion_jax.errors import ConfigError
from diffusion_jax.training.setup import build_model, model_apply, model_kwargs

TINY_SD_UNET = dict(  # SD 1.x's block layout at small widths: attention on the first level, the middle, and up
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=16, attention_head_dim=2, norm_num_groups=32,
)
SD15_UNET = {  # runwayml/stable-diffusion-v1-5's unet/config.json (CompVis/stable-diffusion-v1-4's is the same)
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD_UNET_PARAMS = 859_520_964  # SD 1.x's U-Net, diffusers' count


def sd_config(**model):
    """Our U-Net configured as the tiny SD U-Net (by hand: the import checks `model_config` against it)."""
    config = base_config()
    config.data.image_size = 8
    config.model.update(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0, num_heads=2)
    config.model.update(dict(context_dim=16, norm_eps=1e-5, downsample_padding=1) | model)
    return config


@pytest.fixture(scope="module")
def sd_unet(tmp_path_factory):
    """(torch UNet2DConditionModel, its diffusers folder, our graphdef, our imported params)."""
    torch.manual_seed(0)
    model = randomised(UNet2DConditionModel(**TINY_SD_UNET))
    folder = tmp_path_factory.mktemp("sd") / "unet"
    graphdef, params = saved_and_imported(model, folder, sd_config(), (8, 8, 4))
    return model, folder, graphdef, params


def sd_blocks(ours: nnx.Module) -> list:
    """(torch submodule, our module, input adapter) for every block of the two U-Nets, in both's order."""
    emb = lambda args: to_nhwc(args[1])  # noqa: E731  the resnets' time embedding
    image = lambda args: (to_nhwc(args[0]),)  # noqa: E731
    attend = lambda args: (to_nhwc(args[0]), args[1].numpy())  # noqa: E731  (hidden_states, encoder_hidden_states)
    blocks = [("time_embedding", lambda x: ours.cond.time.dense1(nnx.silu(ours.cond.time.dense0(x))), image)]
    for path, levels in (("down_blocks", ours.down), ("up_blocks", ours.up)):
        for i, level in enumerate(levels):
            for j, stage in enumerate(level.stages):
                blocks.append((f"{path}.{i}.resnets.{j}", lambda x, e, s=stage: s.res(x, e),
                               lambda a: (to_nhwc(a[0]), emb(a))))
                if stage.attn is not None:
                    blocks.append((f"{path}.{i}.attentions.{j}", stage.attn, attend))
            if level.resample is not None:
                sampler = "downsamplers" if path == "down_blocks" else "upsamplers"
                blocks.append((f"{path}.{i}.{sampler}.0", lambda x, r=level.resample: r(x, None, False, None), image))
    blocks += [("mid_block.resnets.0", lambda x, e: ours.mid_block1(x, e), lambda a: (to_nhwc(a[0]), emb(a))),
               ("mid_block.attentions.0", ours.mid_attn, attend),
               ("mid_block.resnets.1", lambda x, e: ours.mid_block2(x, e), lambda a: (to_nhwc(a[0]), emb(a))),
               ("conv_norm_out", ours.norm_out, image)]
    return blocks


def inputs(batch: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Latents [B, 4, 8, 8], timesteps [B], a context [B, 5, 16] (SD's would be CLIP's [B, 77, 768])."""
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(batch, 4, 8, 8, generator=generator), torch.tensor([10, 637][:batch]),
            torch.randn(batch, 5, 16, generator=generator))


def test_a_sd_unet2dconditionmodel_imports_to_our_unet_output_for_output(sd_unet):
    model, _, graphdef, params = sd_unet
    x, t, context = inputs()
    with torch.no_grad():
        theirs = to_nhwc(model(x, t, encoder_hidden_states=context).sample)
    ours = jax.jit(model_apply, static_argnums=0)(graphdef, params, jnp.asarray(to_nhwc(x)), jnp.asarray(t.numpy()),
                                                  {"context": jnp.asarray(context.numpy())})
    error = relative_error(np.asarray(ours), theirs)
    where = None if error <= 1e-4 else first_divergence(
        model, lambda: model(x, t, encoder_hidden_states=context), sd_blocks(nnx.merge(graphdef, params)))
    assert error <= 1e-4, f"relative error {error:.2e}; first block that diverges: {where}"


def test_the_sd_options_reach_the_blocks_that_need_them(sd_unet):
    """SD's symmetric downsampling padding: with ours (SAME, 0 before and 1 after) the same weights diverge at the
    first downsampler. SD's GroupNorm eps 1e-5 (ResNets, output; its transformers' GroupNorm keeps 1e-6 and their
    LayerNorms 1e-5): at these activations (variance ~1) 1e-6 would move the output by ~1e-6 only, below what a
    parity test resolves, so the built norms are checked instead."""
    model, _, graphdef, params = sd_unet
    x, t, context = inputs(batch=1)
    run = lambda: model(x, t, encoder_hidden_states=context)  # noqa: E731
    ours = nnx.merge(graphdef, params)
    assert first_divergence(model, run, sd_blocks(ours)) is None  # every block agrees, and every adapter runs
    same, _ = build_model(sd_config(downsample_padding=None), (8, 8, 4))
    where = first_divergence(model, run, sd_blocks(nnx.merge(same, params)))
    assert where is not None and where.startswith("down_blocks.0.downsamplers.0: relative error"), where
    block = ours.mid_attn.transformer_blocks[0]
    epsilons = [ours.down[0].stages[0].res.norm1.epsilon, ours.mid_block2.norm2.epsilon, ours.norm_out.epsilon,
                ours.mid_attn.norm.epsilon, block.norm1.epsilon, block.norm3.epsilon]
    assert epsilons == [1e-5, 1e-5, 1e-5, 1e-6, 1e-5, 1e-5]


def test_a_config_that_contradicts_the_checkpoint_is_one_line(sd_unet):
    _, folder, _, _ = sd_unet
    config = sd_config(num_heads=1)
    graphdef, init = build_model(config, (8, 8, 4))
    with pytest.raises(ConfigError, match=r"^model.num_heads: 1 in this config, but model.pretrained's config.json "
                                          r"makes it 2"):
        convert.import_weights(config, init, (8, 8, 4), folder)


@pytest.mark.parametrize("field, value, message", [
    ("use_linear_projection", True, r"use_linear_projection=True; our U-Net computes use_linear_projection=False"),
    ("class_embed_type", "timestep", r"class_embed_type='timestep'; our U-Net computes class_embed_type=None"),
    ("addition_embed_type", "text_time", r"addition_embed_type='text_time'; our U-Net computes"),
    ("time_cond_proj_dim", 256, r"time_cond_proj_dim=256; our U-Net computes time_cond_proj_dim=None"),
    ("only_cross_attention", True, r"only_cross_attention=True; our U-Net computes only_cross_attention=False"),
    ("dual_cross_attention", True, r"dual_cross_attention=True"),
    ("resnet_time_scale_shift", "scale_shift", r"resnet_time_scale_shift='scale_shift'; our U-Net computes "
                                               r"resnet_time_scale_shift='default'"),
    ("attention_head_dim", [5, 10, 20, 20], r"attention_head_dim=\[5, 10, 20, 20\]; our U-Net uses one value"),
    ("downsample_padding", 2, r"downsample_padding=2; our U-Net computes 0 \(SAME\) or 1"),
])
def test_what_our_unet_does_not_compute_is_refused_in_one_line(field, value, message):
    with pytest.raises(ConfigError, match=rf"^model.pretrained: its config.json has {message}"):
        unet2d_condition.model_config(SD15_UNET | {field: value})


def test_the_sd_mapping_places_every_tensor_of_the_full_sd15_unet():
    derived = unet2d_condition.model_config(SD15_UNET | {"upcast_attention": True})  # fp32: no effect
    assert derived == dict(ch=320, ch_mult=(1, 2, 4, 4), num_res_blocks=2, attn_resolutions=(64, 32, 16), num_heads=8,
                           num_head_channels=None, context_dim=768, transformer_depth=1, learn_sigma=False,
                           time_freq_shift=0.0, norm_eps=1e-5, downsample_padding=1, image_size=64, in_channels=4)
    with torch.device("meta"):  # shapes only: nothing allocated
        full = UNet2DConditionModel(**{k: v for k, v in SD15_UNET.items() if not k.startswith("_")})
    shapes = {name: tuple(t.shape) for name, t in full.state_dict().items()}
    config = base_config()
    config.model.update(convert.config_overrides_of(derived) | {"dropout": 0.0})
    abstract = nnx.state(nnx.eval_shape(lambda: models.create("unet", rngs=nnx.Rngs(0),
                                                              **model_kwargs(config, (64, 64, 4)))), nnx.Param)
    tensors = source.TensorSource(shapes, None, "UNet2DConditionModel (meta)")
    assert convert.format_of(config, tensors) is unet2d_condition  # no config.json: known by its attn2 tensors
    assert convert.format_of(config, source.TensorSource({"conv_in.weight": (1,)}, None, "")) is unet2d
    planned, _ = mapping.plan(unet2d_condition.rules(flip_sin_to_cos=True), abstract, tensors)
    ours = sum(leaf.size for leaf in jax.tree.leaves(abstract))
    assert ours == sum(np.prod(s) for s in shapes.values()) == SD_UNET_PARAMS
    assert len(planned) == len(jax.tree.leaves(abstract)) == len(shapes)
