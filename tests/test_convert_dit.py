"""DiT weight import (`diffusion_jax.convert.dit`): a tiny diffusers `DiTTransformer2DModel` with random weights,
saved as a diffusers folder and, renamed to facebookresearch/DiT's names, as a reference `.pt`; both imported
and run on the same inputs (a mismatch names the first block that diverges, `parity`); the full DiT-XL/2
mapping checked from shapes alone."""

import json
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from diffusers import DiTTransformer2DModel
from diffusers.models.embeddings import get_timestep_embedding
from flax import nnx
from parity import first_divergence, randomised, relative_error, to_nhwc
from safetensors.numpy import load_file, save_file

from diffusion_jax import convert, models
from diffusion_jax.config import base_config, config_from_file
from diffusion_jax.convert import mapping, source
from diffusion_jax.errors import ConfigError
from diffusion_jax.models import dit as dit_model
from diffusion_jax.models.layers import timestep_embedding
from diffusion_jax.training.setup import build_model, model_apply, model_kwargs

TINY_DIT = dict(  # facebook/DiT-XL-2-256's settings at small sizes; norm_eps: the reference's (module docstring)
    sample_size=8, patch_size=2, in_channels=4, out_channels=8, num_layers=2, num_attention_heads=2,
    attention_head_dim=16, num_embeds_ada_norm=10, norm_type="ada_norm_zero", norm_elementwise_affine=False,
    activation_fn="gelu-approximate", attention_bias=True, norm_eps=1e-6,
)
SHAPE = (8, 8, 4)  # the latents the tiny DiT sees
XL2 = TINY_DIT | dict(sample_size=32, num_layers=28, num_attention_heads=16, attention_head_dim=72,
                      num_embeds_ada_norm=1000)
EMBEDDER = "norm1.emb"


def dit_config() -> ml_collections.ConfigDict:
    config = base_config()
    config.model = ml_collections.ConfigDict(dict(name="dit", patch_size=2, hidden_size=32, depth=2, num_heads=2,
                                                  num_classes=10, learn_sigma=True))
    return config


def as_converted(model: DiTTransformer2DModel) -> DiTTransformer2DModel:
    """`model` as diffusers' conversion script makes one: block 0's embedders copied into every block, and
    the reference's timestep embedding (frequencies over half, not half - 1) in each block's copy."""
    first = model.transformer_blocks[0].norm1.emb
    for block in model.transformer_blocks:
        block.norm1.emb.load_state_dict(first.state_dict())
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    return model


def reference_state_dict(model: DiTTransformer2DModel) -> dict[str, torch.Tensor]:
    """`model`'s weights under facebookresearch/DiT's names: diffusers' `convert_dit_to_diffusers.py` reversed,
    with its fixed position table."""
    theirs = model.state_dict()
    emb = f"transformer_blocks.0.{EMBEDDER}"
    ours = {"x_embedder.proj.weight": theirs["pos_embed.proj.weight"],
            "x_embedder.proj.bias": theirs["pos_embed.proj.bias"],
            "t_embedder.mlp.0.weight": theirs[f"{emb}.timestep_embedder.linear_1.weight"],
            "t_embedder.mlp.0.bias": theirs[f"{emb}.timestep_embedder.linear_1.bias"],
            "t_embedder.mlp.2.weight": theirs[f"{emb}.timestep_embedder.linear_2.weight"],
            "t_embedder.mlp.2.bias": theirs[f"{emb}.timestep_embedder.linear_2.bias"],
            "y_embedder.embedding_table.weight": theirs[f"{emb}.class_embedder.embedding_table.weight"],
            "pos_embed": model.pos_embed.pos_embed}
    for i in range(len(model.transformer_blocks)):
        block = f"transformer_blocks.{i}"
        for kind in ("weight", "bias"):
            ours |= {
                f"blocks.{i}.attn.qkv.{kind}": torch.cat([theirs[f"{block}.attn1.to_{x}.{kind}"] for x in "qkv"]),
                f"blocks.{i}.attn.proj.{kind}": theirs[f"{block}.attn1.to_out.0.{kind}"],
                f"blocks.{i}.mlp.fc1.{kind}": theirs[f"{block}.ff.net.0.proj.{kind}"],
                f"blocks.{i}.mlp.fc2.{kind}": theirs[f"{block}.ff.net.2.{kind}"],
                f"blocks.{i}.adaLN_modulation.1.{kind}": theirs[f"{block}.norm1.linear.{kind}"],
            }
    for kind in ("weight", "bias"):
        ours |= {f"final_layer.adaLN_modulation.1.{kind}": theirs[f"proj_out_1.{kind}"],
                 f"final_layer.linear.{kind}": theirs[f"proj_out_2.{kind}"]}
    return ours


def imported(path) -> nnx.State:
    config = dit_config()
    _, init = build_model(config, SHAPE)
    return convert.import_weights(config, init, SHAPE, path)


@pytest.fixture(scope="module")
def tiny_dit(tmp_path_factory):
    """(torch DiT, its diffusers folder, its reference .pt, our graphdef, params from the folder, from the .pt)."""
    torch.manual_seed(0)
    model = as_converted(randomised(DiTTransformer2DModel(**TINY_DIT)))
    root = tmp_path_factory.mktemp("dit")
    model.save_pretrained(root / "transformer")
    torch.save(reference_state_dict(model), root / "DiT-tiny.pt")
    graphdef, _ = build_model(dit_config(), SHAPE)
    return (model, root / "transformer", root / "DiT-tiny.pt", graphdef, imported(root / "transformer"),
            imported(root / "DiT-tiny.pt"))


def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [3, 4, 8, 8], t, labels (the last one the null label, 10)."""
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    return x, torch.tensor([0, 412, 999]), torch.tensor([3, 7, 10])


def dit_blocks(ours: nnx.Module, depth: int) -> list:
    """(torch submodule, our module, input adapter) for the blocks of the two DiTs, in diffusers' names."""
    cond = lambda t, y: ours.cond(jnp.asarray(t.numpy()), jnp.asarray(y.numpy()))  # noqa: E731
    grid = TINY_DIT["sample_size"] // TINY_DIT["patch_size"]
    pos = dit_model.get_2d_sincos_pos_embed(32, grid)
    blocks = [("pos_embed", lambda x: ours.x_embedder(x).reshape(x.shape[0], grid * grid, -1) + pos,
               lambda a: (to_nhwc(a[0]),)),
              (f"transformer_blocks.0.{EMBEDDER}", lambda t, y: cond(t, y), lambda a: (a[0], a[1]))]
    # a block's recorded inputs: hidden_states, then its keyword arguments (timestep 4th, class_labels 6th)
    blocks += [(f"transformer_blocks.{i}", lambda h, t, y, b=ours.blocks[i]: b(jnp.asarray(h), cond(t, y)),
                lambda a: (to_nhwc(a[0]), a[4], a[6])) for i in range(depth)]
    blocks += [("proj_out_1", ours.final_layer.adaln_modulation, lambda a: (to_nhwc(a[0]),)),
               ("proj_out_2", ours.final_layer.linear, lambda a: (to_nhwc(a[0]),))]
    return blocks


def divergence(model: DiTTransformer2DModel, graphdef: nnx.GraphDef, params: nnx.State) -> str | None:
    x, t, y = inputs()
    ours = nnx.merge(graphdef, params)
    return first_divergence(model, lambda: model(x, t, class_labels=y),
                            dit_blocks(ours, len(model.transformer_blocks)))


def test_a_diffusers_dit_imports_to_our_dit_output_for_output(tiny_dit):
    model, _, _, graphdef, params, _ = tiny_dit
    x, t, y = inputs()
    with torch.no_grad():
        theirs = to_nhwc(model(x, t, class_labels=y).sample)
    run = jax.jit(model_apply, static_argnums=0)
    ours = run(graphdef, params, jnp.asarray(to_nhwc(x)), jnp.asarray(t.numpy()), jnp.asarray(y.numpy()))
    error = relative_error(np.asarray(ours), theirs)
    where = None if error <= 1e-4 else divergence(model, graphdef, params)
    assert error <= 1e-4, f"relative error {error:.2e}; first block that diverges: {where}"


def test_the_reference_state_dict_imports_to_the_same_parameters(tiny_dit):
    _, _, pt, _, from_diffusers, from_reference = tiny_dit
    assert source.open_source(pt).describe.startswith("PyTorch file")
    ours, theirs = mapping.param_paths(from_reference), mapping.param_paths(from_diffusers)
    assert ours.keys() == theirs.keys()
    for path in ours:
        np.testing.assert_array_equal(ours[path], theirs[path], err_msg=path)


def test_a_reference_checkpoint_of_another_resolution_is_refused_by_its_position_table(tiny_dit, tmp_path):
    state = torch.load(tiny_dit[2], weights_only=True)
    tokens, width = state["pos_embed"].shape[1:]
    state["pos_embed"] = torch.zeros(1, 4 * tokens, width)  # the same network trained at twice the size
    torch.save(state, tmp_path / "DiT-tiny-2x.pt")
    with pytest.raises(ConfigError, match=rf"^data.image_size: {SHAPE[0]} in this config, but model.pretrained's "
                                          rf"checkpoint \(by its tensors' shapes\) makes it {2 * SHAPE[0]}"):
        imported(tmp_path / "DiT-tiny-2x.pt")


def test_our_position_table_is_the_reference_buffer_the_import_ignores(tiny_dit):
    model = tiny_dit[0]
    table = dit_model.get_2d_sincos_pos_embed(32, 4)
    np.testing.assert_allclose(table, model.pos_embed.pos_embed[0].numpy(), atol=1e-6)


def test_a_wrong_tensor_is_found_at_its_block(tiny_dit):
    model, _, _, graphdef, params, _ = tiny_dit
    off = "blocks/1/mlp/fc1/kernel"
    broken = jax.tree_util.tree_map_with_path(lambda path, x: x + 0.01 if mapping.path_name(path) == off else x,
                                              params)
    where = divergence(model, graphdef, broken)
    assert where is not None and where.startswith("transformer_blocks.1: relative error"), where
    assert divergence(model, graphdef, params) is None


def test_diffusers_own_timestep_embedding_is_not_the_references():
    """Why `as_converted` sets the shift: diffusers' DiT embeds t with frequencies over half - 1, the reference
    (and ours) over half; the import runs the reference's."""
    t = torch.tensor([0.0, 412.0, 999.0])
    ours = np.asarray(timestep_embedding(jnp.asarray(t.numpy()), 256))
    reference = get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=0).numpy()
    diffusers = get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=1).numpy()
    np.testing.assert_allclose(ours, reference, atol=1e-4)
    assert np.max(np.abs(diffusers - reference)) > 0.5


def test_embedder_copies_that_differ_are_refused(tiny_dit, tmp_path):
    folder = tiny_dit[1]
    tensors = load_file(folder / "diffusion_pytorch_model.safetensors")
    name = f"transformer_blocks.1.{EMBEDDER}.class_embedder.embedding_table.weight"
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, tmp_path / "diffusion_pytorch_model.safetensors")
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    with pytest.raises(ConfigError, match=rf"^model.pretrained: {name} differs from transformer_blocks.0."):
        imported(tmp_path)


def test_a_diffusers_config_that_contradicts_ours_is_one_line(tiny_dit):
    folder = tiny_dit[1]
    config = dit_config()
    config.model.hidden_size = 64
    _, init = build_model(config, SHAPE)
    with pytest.raises(ConfigError, match=r"^model.hidden_size: 64 in this config, but model.pretrained's "
                                          r"config.json makes it 32"):
        convert.import_weights(config, init, SHAPE, folder)
    diffusers = json.loads((folder / "config.json").read_text())
    for field, value, message in [
        ("activation_fn", "gelu", r"activation_fn='gelu'; our DiT computes activation_fn='gelu-approximate'"),
        ("norm_eps", 1e-4, r"norm_eps=0.0001; our DiT computes norm_eps=1e-06"),
        ("out_channels", 5, r"out_channels=5 with in_channels=4"),
    ]:
        with pytest.raises(ConfigError, match=rf"^model.pretrained: its config.json has {message}"):
            convert.dit.model_config(diffusers | {field: value})
    with pytest.raises(ConfigError, match=r"^model.pretrained: no DiT checkpoint: its tensors include neither "
                                          r"x_embedder.proj.weight nor pos_embed.proj.weight"):
        convert.dit.source_options(["conv_in.weight"])


def test_every_dit_name_imports_through_this_format():
    assert {name for name, fmt in convert.FORMATS.items() if fmt is convert.dit} == {"dit", *dit_model.VARIANTS}


def test_the_mappings_place_every_tensor_of_the_full_dit_xl2():
    with torch.device("meta"):  # shapes only: nothing allocated
        full = DiTTransformer2DModel(**XL2)
    diffusers = {name: tuple(t.shape) for name, t in full.state_dict().items()}
    reference = {name: tuple(t.shape) for name, t in reference_state_dict(full).items()}
    config = config_from_file("configs/dit_xl2_imagenet256.py")  # model.name='DiT-XL/2'
    derived = convert.dit.model_config(dict(full.config))
    convert.check_against(config, derived, (32, 32, 4))  # the variant's fields, decided by its name
    assert convert.config_overrides_of(derived) == dict(patch_size=2, hidden_size=1152, depth=28, num_heads=16,
                                                        num_classes=1000, learn_sigma=True)
    kwargs = model_kwargs(config, (32, 32, 4))  # the model build_model makes, traced once
    abstract = nnx.state(nnx.eval_shape(lambda: models.create(config.model.name, rngs=nnx.Rngs(0), **kwargs)))
    for layout, shapes in (("diffusers", diffusers), ("reference", reference)):
        tensors = source.TensorSource(shapes, None, f"DiT-XL/2 {layout} (meta)")
        assert convert.dit.source_options(tensors.names) == {"layout": layout}
        planned, ignored = mapping.plan(convert.dit.rules(layout), abstract, tensors, ignore=convert.dit.IGNORED)
        assert len(planned) == len(jax.tree.leaves(abstract))
        assert len(ignored) == (1 if layout == "reference" else 27 * 5)  # pos_embed; blocks 1-27's embedder copies
    ours = sum(leaf.size for leaf in jax.tree.leaves(abstract))
    embedder = (256 * 1152 + 1152) + (1152 * 1152 + 1152) + 1001 * 1152  # timestep MLP and class table
    assert ours == 674_834_720
    assert sum(np.prod(s) for s in reference.values()) == ours + 256 * 1152 == 675_129_632  # + its pos_embed
    assert sum(np.prod(s) for s in diffusers.values()) == ours + 27 * embedder == 749_826_464  # + 27 copies
