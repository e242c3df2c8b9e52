"""Weight import of diffusers' AutoencoderKL into our first stage (`convert.autoencoder_kl`): a tiny randomised
VAE saved with `save_pretrained`, imported and run on the same inputs (posterior and decoder output; a mismatch
names the first block that diverges, `parity`), its legacy attention names, its config.json checks, and the
full Stable Diffusion VAE's mapping and parameter count on the meta device."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from flax import nnx
from parity import first_divergence, randomised, relative_error, saved_and_imported, to_nhwc
from safetensors.numpy import load_file, save_file

from diffusion_jax import convert
from diffusion_jax.config import base_config
from diffusion_jax.convert import autoencoder_kl, mapping, source
from diffusion_jax.errors import ConfigError
from diffusion_jax.training.setup import build_model, params_key

SD_VAE_EMA = {  # stabilityai/sd-vae-ft-ema's config.json (sd-vae-ft-mse's is the same)
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.4.2", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3,
    "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 256,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
TINY_VAE = dict(  # its architecture at small widths: two levels (f = 2), one resnet per level
    in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
    norm_num_groups=32, sample_size=16, down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
)
# The discriminator's initialiser drawn with the 'rbg' key implementation: threefry's compiles for seconds per
# parameter shape on a loaded 2-core CPU (as in test_autoencoder); the draws differ, not what is checked.
INIT_KEY_IMPL = "rbg"
LEGACY = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}  # early diffusers' names


def first_stage_config(block_out_channels: tuple[int, ...], layers_per_block: int) -> ml_collections.ConfigDict:
    """A first-stage run (`training.objective='autoencode'`) of these widths, with a one-layer discriminator."""
    config = base_config()
    config.model = ml_collections.ConfigDict(dict(
        name="autoencoder_kl", block_out_channels=block_out_channels, layers_per_block=layers_per_block,
        latent_channels=4, norm_num_groups=32, mid_attention=True, disc_layers=1, disc_ndf=8))
    config.training.objective = "autoencode"
    return config


def legacy_name(name: str) -> str:
    """A current diffusers VAE tensor name as early diffusers saved it."""
    for new, old in LEGACY.items():
        name = name.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
    return name


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    """(torch AutoencoderKL, its diffusers folder, our config, graphdef and imported params)."""
    torch.manual_seed(0)
    model = randomised(AutoencoderKL(**TINY_VAE))
    folder = tmp_path_factory.mktemp("vae") / "vae"
    config = first_stage_config((32, 64), 1)
    with jax.default_prng_impl(INIT_KEY_IMPL):  # the discriminator is drawn by the initialiser
        graphdef, params = saved_and_imported(model, folder, config, (16, 16, 3))
    return model, folder, config, graphdef, params


def vae_blocks(ours: nnx.Module) -> list:
    """(torch submodule, our module, input adapter) for the blocks of the two autoencoders (`first_divergence`
    reports them in the torch model's execution order, so a layer before the block that holds it)."""
    first = lambda a: (to_nhwc(a[0]),)  # noqa: E731  each block's one image input (diffusers passes temb=None)
    blocks = []
    for part, name in (("encoder", "down_blocks"), ("decoder", "up_blocks")):
        coder = getattr(ours, part)
        blocks += [(f"{part}.conv_in", coder.conv_in, first), (f"{part}.mid_block", coder.mid_block, first),
                   (f"{part}.mid_block.attentions.0", coder.mid_block.attentions[0], first)]
        blocks += [(f"{part}.mid_block.resnets.{j}", resnet, first) for j, resnet in enumerate(coder.mid_block.resnets)]
        for i, level in enumerate(getattr(coder, name)):
            blocks.append((f"{part}.{name}.{i}", level, first))
            blocks += [(f"{part}.{name}.{i}.resnets.{j}", resnet, first) for j, resnet in enumerate(level.resnets)]
        blocks += [(f"{part}.conv_norm_out", coder.conv_norm_out, first), (f"{part}.conv_out", coder.conv_out, first)]
    return blocks + [("quant_conv", ours.quant_conv, first), ("post_quant_conv", ours.post_quant_conv, first)]


@functools.partial(jax.jit, static_argnums=0)
def encode_decode(graphdef: nnx.GraphDef, params: nnx.State, x: jax.Array, z: jax.Array) -> dict[str, jax.Array]:
    """Our first stage's posterior of images `x` and decoding of latents `z` (one compiled program)."""
    autoencoder = nnx.merge(graphdef, params).autoencoder
    posterior = autoencoder.encode(x)
    return {"mean": posterior.mean, "logvar": posterior.logvar, "decoded": autoencoder.decode(z)}


def test_a_diffusers_autoencoderkl_imports_to_our_first_stage_posterior_and_decoder_alike(tiny_vae):
    model, _, _, graphdef, params = tiny_vae
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        posterior = model.encode(x).latent_dist
        theirs = {"mean": posterior.mean, "logvar": posterior.logvar, "decoded": model.decode(z).sample}
    ours = encode_decode(graphdef, params, jnp.asarray(to_nhwc(x)), jnp.asarray(to_nhwc(z)))
    errors = {k: relative_error(np.asarray(ours[k]), to_nhwc(theirs[k])) for k in theirs}
    where = None if max(errors.values()) <= 1e-4 else first_divergence(
        model, lambda: (model.encode(x), model.decode(z)), vae_blocks(nnx.merge(graphdef, params).autoencoder))
    assert max(errors.values()) <= 1e-4, f"relative errors {errors}; first block that diverges: {where}"


def test_the_discriminator_no_checkpoint_holds_is_the_initialisers(tiny_vae):
    _, _, config, _, params = tiny_vae
    _, init = build_model(config, (16, 16, 3))
    with jax.default_prng_impl(INIT_KEY_IMPL):  # a new run's parameters: init(params_key(config))
        drawn = jax.jit(lambda key: init(key)["discriminator"])(params_key(config))
    for ours, initial in zip(jax.tree.leaves(params["discriminator"]), jax.tree.leaves(drawn), strict=True):
        np.testing.assert_array_equal(ours, initial)
    assert any(np.any(leaf != 0) for leaf in jax.tree.leaves(drawn))


def test_early_diffusers_attention_names_import_the_same_weights(tiny_vae, tmp_path):
    _, folder, config, graphdef, params = tiny_vae
    tensors = load_file(folder / "diffusion_pytorch_model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    save_file({legacy_name(k): v for k, v in tensors.items()}, tmp_path / "diffusion_pytorch_model.safetensors")
    legacy = source.open_source(tmp_path)
    assert "encoder.mid_block.attentions.0.query.weight" in legacy
    options = autoencoder_kl.source_options(legacy.names)
    assert options == {"attention_names": "legacy"}
    _, init = build_model(config, (16, 16, 3))
    convert.importer(config, init, (16, 16, 3), tmp_path)  # plans: every name and shape placed
    imported, _ = mapping.convert(autoencoder_kl.rules(**options), jax.eval_shape(lambda: params)["autoencoder"],
                                  legacy)
    for ours, theirs in zip(jax.tree.leaves(imported), jax.tree.leaves(params["autoencoder"]), strict=True):
        np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("field, value, message", [
    ("act_fn", "gelu", r"its config.json has act_fn='gelu'; our AutoencoderKL computes act_fn='silu'"),
    ("use_quant_conv", False, r"has use_quant_conv=False; our AutoencoderKL computes use_quant_conv=True"),
    ("shift_factor", 0.1159, r"has shift_factor=0.1159; our AutoencoderKL computes shift_factor=None"),
    ("down_block_types", ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"] * 2,
     r"down_block_types=\[.*AttnDownEncoderBlock2D.*\]; our AutoencoderKL has 4 DownEncoderBlock2D"),
    ("out_channels", 6, r"has out_channels=6 and in_channels=3; our AutoencoderKL reconstructs"),
    ("_class_name", "AutoencoderTiny", r"its config.json is a AutoencoderTiny; model.name='autoencoder_kl'"),
])
def test_what_our_autoencoder_does_not_compute_is_refused_in_one_line(field, value, message):
    with pytest.raises(ConfigError, match=rf"^model.pretrained: .*{message}"):
        autoencoder_kl.model_config(SD_VAE_EMA | {field: value})


def test_the_sd_vae_config_json_gives_our_fields_and_its_scale(tiny_vae):
    assert autoencoder_kl.model_config(SD_VAE_EMA) == dict(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, norm_num_groups=32,
        mid_attention=True, in_channels=3)
    assert autoencoder_kl.scaling_factor(SD_VAE_EMA) == 0.18215  # sd-vae-ft-*: diffusers' default
    assert autoencoder_kl.scaling_factor(SD_VAE_EMA | {"scaling_factor": 0.13025}) == 0.13025
    _, folder, _, _, _ = tiny_vae
    config = first_stage_config((32, 64), 2)
    _, init = build_model(config, (16, 16, 3))
    with pytest.raises(ConfigError, match=r"^model.layers_per_block: 2 in this config, but model.pretrained's "
                                          r"config.json makes it 1"):
        convert.importer(config, init, (16, 16, 3), folder)


def test_the_mapping_places_every_tensor_of_the_full_sd_vae():
    with torch.device("meta"):  # shapes only: nothing allocated
        full = AutoencoderKL(**{k: v for k, v in SD_VAE_EMA.items() if not k.startswith("_")})
    shapes = {name: tuple(t.shape) for name, t in full.state_dict().items()}
    config = first_stage_config((128, 256, 512, 512), 2)
    config.model.update(convert.config_overrides_of(autoencoder_kl.model_config(SD_VAE_EMA)))
    _, init = build_model(config, (256, 256, 3))
    abstract = jax.eval_shape(init, jax.random.key(0))["autoencoder"]
    for names in (shapes, {legacy_name(k): v for k, v in shapes.items()}):
        rules = autoencoder_kl.rules(**autoencoder_kl.source_options(list(names)))
        planned, _ = mapping.plan(rules, abstract, source.TensorSource(names, None, "AutoencoderKL (meta)"))
        assert len(planned) == len(jax.tree.leaves(abstract)) == len(names)
    ours = sum(leaf.size for leaf in jax.tree.leaves(abstract))
    assert ours == sum(np.prod(s) for s in shapes.values()) == 83_653_863  # the sd-vae-ft-* / SD 1.x VAE's count


def test_a_wrong_tensor_is_found_at_its_block(tiny_vae):
    model, _, _, graphdef, params = tiny_vae
    off = "autoencoder/decoder/mid_block/attentions/0/to_q/kernel"
    broken = jax.tree_util.tree_map_with_path(lambda path, x: x + 0.01 if mapping.path_name(path) == off else x,
                                              params)
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    run = lambda: (model.encode(x), model.decode(z))  # noqa: E731
    where = first_divergence(model, run, vae_blocks(nnx.merge(graphdef, broken).autoencoder))
    assert where is not None and where.startswith("decoder.mid_block.attentions.0: relative error")
    assert first_divergence(model, run, vae_blocks(nnx.merge(graphdef, params).autoencoder)) is None
