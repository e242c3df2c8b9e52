"""LDM's two stages end to end at toy size: a first-stage run (autoencoder + patch GAN), then a latent
diffusion run on its frozen latents with text cross-attention; and the one-line errors of bad input."""

import json

import jax
import numpy as np
import pytest
from conftest import tiny_digits_config

import diffusion_jax as dj
from diffusion_jax import latent
from diffusion_jax.data import latent_cache
from diffusion_jax.data.encode_latents import encode_latents
from diffusion_jax.errors import ConfigError
from diffusion_jax.evaluate import evaluate
from diffusion_jax.sample import sample
from diffusion_jax.training import experiment
from diffusion_jax.training.loop import train


def first_stage_config(data_dir: str):
    config = tiny_digits_config(data_dir)  # 8x8 digits
    config.model = type(config.model)(dict(
        name="autoencoder_kl", block_out_channels=(8, 16), layers_per_block=1, latent_channels=2,
        norm_num_groups=32, mid_attention=True, disc_layers=1, disc_ndf=8,
    ))
    config.training.update(objective="autoencode", num_steps=3, checkpoint_every=3, sample_every=3, log_every=1)
    config.autoencode.update(disc_start=2)  # the GAN from the second step on
    config.sample.update(ema_decay=None, num_samples=8, batch_size=8)
    return config


@pytest.fixture(scope="module")
def first_stage_run(tmp_path_factory, digits_data_dir):
    workdir = tmp_path_factory.mktemp("ae")
    state = train(first_stage_config(digits_data_dir), workdir)
    return workdir, state


def test_a_first_stage_run_trains_both_players_and_writes_reconstructions(first_stage_run):
    workdir, state = first_stage_run
    logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [sorted(k for k in m if k in ("rec", "kl", "d_loss", "psnr", "g_adv")) for m in logged][0] == [
        "d_loss", "g_adv", "kl", "psnr", "rec"]
    assert all(np.isfinite(m["loss"]) and m["psnr"] > 0 for m in logged)
    assert logged[0]["d_loss"] > 0 and "discriminator" in state.params  # one state holds both players
    pairs = np.load(workdir / "samples" / "samples_3.npz")["arr_0"]  # held-out digits beside reconstructions
    assert pairs.shape == (8, 8, 8, 1)
    assert not np.array_equal(pairs[0], pairs[1])  # an untrained reconstruction differs from its input


def test_eval_mode_scores_a_first_stage_on_its_reconstructions(first_stage_run, digits_data_dir):
    workdir, _ = first_stage_run
    config = first_stage_config(digits_data_dir)
    config.eval.update(metrics=("psnr", "ssim"), num_examples=32, batch_size=16)
    results = evaluate(config, workdir)
    assert 0 < results["metrics"]["psnr"] < 60 and -1 < results["metrics"]["ssim"] < 1
    assert results["protocol"]["reconstructions"]["num_examples"] == 32
    config.eval.metrics = ("vlb_bpd",)
    with pytest.raises(ConfigError, match=r"^eval.metrics: vlb_bpd; a training.objective='autoencode' run is scored"):
        evaluate(config, workdir)


def latent_config(data_dir: str, ae_workdir):
    config = tiny_digits_config(data_dir)
    config.latent.autoencoder_workdir = str(ae_workdir)
    config.data.captions = True
    config.model.update(attn_resolutions=(2,), text_encoder=dict(width=16, depth=1, num_heads=2))
    config.training.update(num_steps=2, checkpoint_every=2, sample_every=2, label_dropout=0.1)
    config.sample.update(guidance_scale=2.0, steps=2)
    return config


def test_latent_diffusion_trains_on_scaled_latents_and_samples_pixels(
    first_stage_run, digits_data_dir, latent_cache_dir, tmp_path
):
    ae_workdir, _ = first_stage_run
    config = latent_config(digits_data_dir, ae_workdir)
    exp = experiment.build(config)
    assert exp.example_shape == (4, 4, 2)  # 8x8x1 digits -> f = 2 latents of 2 channels
    train(config, tmp_path)
    scale = json.loads((tmp_path / "config.json").read_text())["latent"]["scale_factor"]
    assert scale > 0  # LDM's 1 / std(z) of the first batch, stored with the run
    model = dj.load(tmp_path)
    assert model.config.latent.scale_factor == scale and model.example_shape == (4, 4, 2)
    assert model.sample(jax.random.key(0), 2, steps=2).shape == (2, 8, 8, 1)  # decoded to pixels
    assert np.load(tmp_path / "samples" / "samples_2.npz")["arr_0"].shape == (8, 8, 8, 1)  # decoded pixels

    # Sample mode and resumes read the scale factor back from the checkpoint.
    again = latent_config(digits_data_dir, ae_workdir)
    png, npz = sample(again, tmp_path)
    assert np.load(npz)["arr_0"].shape == (8, 8, 8, 1)
    again = latent_config(digits_data_dir, ae_workdir)
    again.training.num_steps = 3
    again.latent.cache_dir = str(latent_cache_dir)  # resumed on cached latents (written with flips)
    assert int(train(again, tmp_path).step) == 3
    assert not (tmp_path / "config_history.jsonl").read_text().count("scale_factor")


@pytest.fixture(scope="module")
def latent_cache_dir(first_stage_run, digits_data_dir, tmp_path_factory):
    """The latents of the digits' train split, with their mirrors, written in two sittings (a resume)."""
    config = latent_config(digits_data_dir, first_stage_run[0])
    config.data.random_flip = True
    out = tmp_path_factory.mktemp("latents")
    encode_latents(config, out, batch_size=512)
    meta = latent_cache.read_meta(out)
    moments = np.load(out / latent_cache.MOMENTS).copy()
    stopped = np.load(out / latent_cache.MOMENTS, mmap_mode="r+")  # as if stopped after the first chunk
    stopped[512:] = 0
    stopped.flush()
    latent_cache.write_meta(out, meta | {"encoded": 512})
    with pytest.raises(ConfigError, match=r"^latent.cache_dir: .* is unfinished \(512 of \d+ examples encoded\)"):
        latent_cache.open_cache(out, config, str(first_stage_run[0]), 3, (4, 4, 2))
    encode_latents(config, out, batch_size=512)  # continues from row 512
    np.testing.assert_array_equal(np.load(out / latent_cache.MOMENTS), moments)
    assert meta["num_examples"] > 1024 and moments.shape == (meta["num_examples"], 2, 4, 4, 4)
    return out


def test_cached_latents_are_the_latents_encoded_on_the_fly(first_stage_run, digits_data_dir, latent_cache_dir):
    config = latent_config(digits_data_dir, first_stage_run[0])
    config.data.random_flip = True
    exp = experiment.build(config)
    first_stage, key = exp.first_stage._replace(scale_factor=0.5), jax.random.key(3)
    fly = latent.training_batches(config, first_stage, exp.batch_sharding, 7, key)
    config.latent.cache_dir = str(latent_cache_dir)
    cached = latent.training_batches(config, first_stage, exp.batch_sharding, 7, key)
    for _ in range(2):  # steps 7 and 8: the same examples, flips, captions and posterior samples
        a, b = next(fly), next(cached)
        assert sorted(a) == sorted(b) == ["image", "label", "token_mask", "tokens"]
        np.testing.assert_allclose(np.asarray(a["image"]), np.asarray(b["image"]), atol=1e-5)
        for k in ("label", "tokens"):
            np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))

    config.data.image_size = 16
    with pytest.raises(ConfigError, match=r"^data.image_size: the latent cache at .* holds 8, this run has 16"):
        latent_cache.open_cache(latent_cache_dir, config, str(first_stage_run[0]), 3, (8, 8, 2))
    with pytest.raises(ConfigError, match=r"^latent.cache_dir: no latent cache at .*nowhere \(no meta.json\); write"):
        latent_cache.open_cache(latent_cache_dir / "nowhere", config, str(first_stage_run[0]), 3, (8, 8, 2))
    config.data.image_size = 8
    with pytest.raises(ConfigError, match=r"^--out: .* holds a latent cache with --dtype = 'float32', not .*'float16'"):
        encode_latents(config, latent_cache_dir, dtype="float16")


def test_bad_latent_setups_are_one_line_errors(first_stage_run, digits_data_dir, tmp_path):
    ae_workdir, _ = first_stage_run
    config = latent_config(digits_data_dir, tmp_path / "nowhere")
    with pytest.raises(ConfigError, match=r"^latent.autoencoder_workdir: .*nowhere has no checkpoints/ directory"):
        experiment.build(config)
    diffusion_run = tmp_path / "ddpm"
    plain = tiny_digits_config(digits_data_dir)
    plain.training.update(num_steps=1, sample_every=0, checkpoint_every=1)
    train(plain, diffusion_run)
    with pytest.raises(ConfigError, match=r"^latent.autoencoder_workdir: .* is not a first-stage run"):
        experiment.build(latent_config(digits_data_dir, diffusion_run))
    config = latent_config(digits_data_dir, ae_workdir)
    config.data.image_size = 16
    with pytest.raises(ConfigError, match=r"^data.image_size: the autoencoder of .* was trained on \(8, 8, 1\) images"):
        experiment.build(config)
    first_stage = latent.load_first_stage(latent_config(digits_data_dir, ae_workdir), (8, 8, 1))
    with pytest.raises(ConfigError, match=r"^latent.scale_factor: missing"):
        first_stage.decode(np.zeros((1, 4, 4, 2), np.float32))
    bad = first_stage_config(digits_data_dir)
    bad.training.objective = "denoise"
    with pytest.raises(ConfigError, match=r"^training.objective: 'autoencode' trains LDM's first stage"):
        experiment.build(bad)
