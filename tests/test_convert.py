"""Weight import (`diffusion_jax.convert`): PyTorch / diffusers models built here with random weights, saved,
imported and run on the same inputs; a mismatch names the first block that diverges (`parity`)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel
from flax import nnx
from parity import first_divergence, randomised, relative_error, saved_and_imported, to_nhwc

import diffusion_jax as dj
from diffusion_jax import convert
from diffusion_jax.config import base_config
from diffusion_jax.convert import mapping, source
from diffusion_jax.errors import ConfigError
from diffusion_jax.training.setup import build_model, model_apply

DDPM_UNET = dict(  # google/ddpm-cifar10-32's UNet2DModel settings (Ho et al.'s TF U-Net), at small widths
    sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=32, norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
    attention_head_dim=None, act_fn="silu",
)


def unet_config():
    config = base_config()
    config.data.image_size = 16
    config.model.update(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0)
    config.model.time_freq_shift = 1.0
    return config


@pytest.fixture(scope="module")
def ddpm_unet(tmp_path_factory):
    """(torch UNet2DModel, its diffusers folder, our graphdef, our imported params)."""
    torch.manual_seed(0)
    model = randomised(UNet2DModel(**DDPM_UNET))
    folder = tmp_path_factory.mktemp("ddpm") / "unet"
    graphdef, params = saved_and_imported(model, folder, unet_config(), (16, 16, 3))
    return model, folder, graphdef, params


def unet_blocks(model: UNet2DModel, ours: nnx.Module) -> list:
    """(torch submodule, our module, input adapter) for every block of the two U-Nets."""
    emb = lambda args: to_nhwc(args[1])  # noqa: E731  the resnets' time embedding
    blocks = [("time_embedding", lambda x: ours.cond.time.dense1(nnx.silu(ours.cond.time.dense0(x))),
               lambda a: (np.roll(to_nhwc(a[0]), a[0].shape[1] // 2, axis=1),))]
    for path, stages in (("down_blocks", ours.down), ("up_blocks", ours.up)):
        for i, level in enumerate(stages):
            for j, stage in enumerate(level.stages):
                blocks.append((f"{path}.{i}.resnets.{j}", lambda x, e, s=stage: s.res(x, e),
                               lambda a: (to_nhwc(a[0]), emb(a))))
                if stage.attn is not None:
                    blocks.append((f"{path}.{i}.attentions.{j}", stage.attn, lambda a: (to_nhwc(a[0]),)))
    blocks += [("mid_block.resnets.0", lambda x, e: ours.mid_block1(x, e), lambda a: (to_nhwc(a[0]), emb(a))),
               ("mid_block.attentions.0", ours.mid_attn, lambda a: (to_nhwc(a[0]),)),
               ("mid_block.resnets.1", lambda x, e: ours.mid_block2(x, e), lambda a: (to_nhwc(a[0]), emb(a)))]
    return blocks


def test_a_ddpm_unet2dmodel_imports_to_our_unet_output_for_output(ddpm_unet):
    model, _, graphdef, params = ddpm_unet
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([10, 637])
    with torch.no_grad():
        theirs = to_nhwc(model(x, t).sample)
    ours = model_apply(graphdef, params, jnp.asarray(to_nhwc(x)), jnp.asarray(t.numpy()))
    error = relative_error(np.asarray(ours), theirs)
    where = None if error <= 1e-4 else first_divergence(
        model, lambda: model(x, t), unet_blocks(model, nnx.merge(graphdef, params)))
    assert error <= 1e-4, f"relative error {error:.2e}; first block that diverges: {where}"


def test_twenty_ddim_steps_match_the_diffusers_pipeline(ddpm_unet):
    model, _, graphdef, params = ddpm_unet
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                              clip_sample=True, set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading")
    pipeline = DDIMPipeline(unet=model, scheduler=scheduler)
    # use_clipped_model_output: ε recomputed from the clipped x̂_0, as ADM's DDIM and ours do (diffusers'
    # default keeps the network's ε beside the clipped x̂_0)
    theirs = pipeline(batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=20, eta=0.0,
                      use_clipped_model_output=True, output_type="np").images  # [B, H, W, C] in [0, 1]
    noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))  # the pipeline's x_T
    schedule = dj.schedules.get("linear", 1000)
    model_fn = lambda x, t: model_apply(graphdef, params, x, t)  # noqa: E731
    x0 = dj.samplers.get("ddim")(model_fn, schedule, jax.random.key(0), jnp.asarray(to_nhwc(noise)), steps=20,
                                 spacing="leading", eta=0.0, clip_x0=1.0)
    ours = np.clip(np.asarray(x0) / 2 + 0.5, 0.0, 1.0)
    assert np.max(np.abs(ours - theirs)) <= 1e-4, np.max(np.abs(ours - theirs))


def test_a_diffusers_config_that_contradicts_ours_is_one_line(ddpm_unet, tmp_path):
    _, folder, _, _ = ddpm_unet
    config = unet_config()
    config.model.ch = 64
    graphdef, init = build_model(config, (16, 16, 3))
    with pytest.raises(ConfigError, match=r"^model.ch: 64 in this config, but model.pretrained's config.json "
                                          r"makes it 32"):
        convert.import_weights(config, init, (16, 16, 3), folder)
    odd = json.loads((folder / "config.json").read_text()) | {"norm_eps": 1e-5}
    with pytest.raises(ConfigError, match=r"^model.pretrained: its config.json has norm_eps=1e-05; our U-Net "
                                          r"computes norm_eps=1e-06"):
        convert.unet2d.model_config(odd)


def test_the_mapping_reports_what_it_cannot_place(tmp_path):
    from safetensors.numpy import save_file

    target = {"dense": {"kernel": jax.ShapeDtypeStruct((4, 3), jnp.float32),
                        "bias": jax.ShapeDtypeStruct((3,), jnp.float32)}}
    rules = [mapping.Rule(r"dense/kernel", "fc.weight", "linear"), mapping.Rule(r"dense/bias", "fc.bias")]
    good = {"fc.weight": np.ones((3, 4), np.float32), "fc.bias": np.zeros(3, np.float32)}
    cases = [
        (good | {"fc.extra": np.zeros(1, np.float32)},
         r"^model.pretrained: 1 tensors of .* are used by no rule.*fc.extra"),
        ({"fc.weight": good["fc.weight"]}, r"^model.pretrained: .* lacks 1 tensors the model needs: fc.bias"),
        (good | {"fc.weight": np.ones((3, 5), np.float32)},
         r"^model.pretrained: dense/kernel has shape \(4, 3\) here, but fc.weight \(3, 5\) makes \(5, 3\) \(linear\)"),
    ]
    for i, (tensors, message) in enumerate(cases):
        save_file(tensors, tmp_path / f"{i}.safetensors")
        with pytest.raises(ConfigError, match=message):
            mapping.convert(rules, target, source.open_source(tmp_path / f"{i}.safetensors"))
    save_file(good, tmp_path / "good.safetensors")
    params, report = mapping.convert(rules, target, source.open_source(tmp_path / "good.safetensors"))
    np.testing.assert_array_equal(params["dense"]["kernel"], np.ones((4, 3)))
    assert report.used == {"dense/kernel": ("fc.weight",), "dense/bias": ("fc.bias",)}
    with pytest.raises(ConfigError, match=r"^model.pretrained: no conversion rule for 1 of our parameters: dense/bias"):
        mapping.convert(rules[:1], target, source.open_source(tmp_path / "good.safetensors"))


def test_the_unet_mapping_places_every_tensor_of_the_full_ddpm_cifar10_model():
    with torch.device("meta"):  # shapes only: nothing allocated
        full = UNet2DModel(**(DDPM_UNET | dict(sample_size=32, block_out_channels=(128, 256, 256, 256),
                                               layers_per_block=2, norm_num_groups=32,
                                               down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D",
                                                                 "DownBlock2D"),
                                               up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D",
                                                               "UpBlock2D"))))
    shapes = {name: tuple(t.shape) for name, t in full.state_dict().items()}
    config = dj.config.config_from_file("configs/ddpm_cifar.py")
    config.model.update(convert.config_overrides_of(convert.unet2d.model_config(dict(full.config))))
    _, init = build_model(config, (32, 32, 3))
    abstract = jax.eval_shape(init, jax.random.key(0))
    planned, _ = mapping.plan(convert.unet2d.rules(flip_sin_to_cos=False), abstract,
                              source.TensorSource(shapes, None, "UNet2DModel (meta)"))
    ours = sum(leaf.size for leaf in jax.tree.leaves(abstract))
    assert ours == sum(np.prod(s) for s in shapes.values()) == 35_746_307  # google/ddpm-cifar10-32's count
    assert len(planned) == len(jax.tree.leaves(abstract))


def test_a_wrong_tensor_is_found_at_its_block(ddpm_unet):
    model, _, graphdef, params = ddpm_unet
    off = "down/1/stages/0/attn/qkv/kernel"
    broken = jax.tree_util.tree_map_with_path(lambda path, x: x + 0.01 if mapping.path_name(path) == off else x,
                                              params)
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    run = lambda: model(x, torch.tensor([5]))  # noqa: E731
    where = first_divergence(model, run, unet_blocks(model, nnx.merge(graphdef, broken)))
    assert where is not None and where.startswith("down_blocks.1.attentions.0: relative error")
    assert first_divergence(model, run, unet_blocks(model, nnx.merge(graphdef, params))) is None


def test_the_command_writes_a_workdir_that_loads_and_samples(ddpm_unet, tmp_path):
    from diffusion_jax.convert.__main__ import write_workdir
    from diffusion_jax.sample import sample

    _, folder, _, params = ddpm_unet
    config = unet_config()
    config.data.name = "cifar10"  # 3 channels; nothing is read from it
    config.model.time_freq_shift = 0.0  # adopted from the folder's config.json (freq_shift=1)
    config.sample.update(sampler="ddim", steps=2, num_samples=8, batch_size=8)
    config.training.batch_size = 8
    write_workdir(config, folder, tmp_path / "imported")
    loaded = dj.load(tmp_path / "imported", ema_decay=None)
    assert loaded.step == 0 and loaded.config.model.time_freq_shift == 1.0 and loaded.config.model.pretrained is None
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, loaded.params, params)))
    with pytest.raises(ConfigError, match=r"^--out: .* already holds checkpoints"):
        write_workdir(config, folder, tmp_path / "imported")

    config.model.time_freq_shift = 1.0
    config.model.pretrained = str(folder)  # an empty workdir: sample mode runs the import as step 0
    png, _ = sample(config, tmp_path / "fresh")
    assert png.name == "samples_0.png" and png.exists()
