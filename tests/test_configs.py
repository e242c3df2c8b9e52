"""The shipped configs: each builds, and the paper configs hold the paper's settings."""

import jax
import pytest
from conftest import load_config
from flax import nnx

from diffusion_jax import data, models
from diffusion_jax.errors import ConfigError
from diffusion_jax.training import experiment
from diffusion_jax.training.setup import build_model, build_process, check_config, model_apply, model_kwargs


@pytest.mark.parametrize(
    "name", ["ddpm_cifar", "iddpm_cifar", "ddpm_digits", "cfg_digits", "dit_digits", "ddpm_swissroll", "ae_digits",
             "edm_digits", "edm_cifar", "ict_cifar", "controlnet_digits"]
)
def test_config_builds_abstractly(name):
    config = load_config(name)
    shape = data.example_shape(config.data)
    schedule = build_process(config)
    graphdef, _ = build_model(config, shape)  # constructor checks, nothing allocated
    check_config(config, schedule, shape)
    assert graphdef is not None


def test_ldm_digits_builds_on_the_latents_of_ae_digits():
    config, first_stage = load_config("ldm_digits"), load_config("ae_digits")
    f = 2 ** (len(first_stage.model.block_out_channels) - 1)
    latent_shape = (config.data.image_size // f, config.data.image_size // f, first_stage.model.latent_channels)
    assert latent_shape == (4, 4, 4) and config.latent.autoencoder_workdir == "runs/ae_digits"
    build_model(config, latent_shape)
    check_config(config, build_process(config), latent_shape)


def test_ddpm_cifar_is_ho_et_al():
    c = load_config("ddpm_cifar")
    assert (c.data.name, c.data.image_size, c.data.random_flip) == ("cifar10", 32, True)
    assert (c.diffusion.schedule, c.diffusion.num_timesteps, c.diffusion.prediction) == ("linear", 1000, "eps")
    assert c.diffusion.loss_weighting == "none"  # L_simple
    optim = c.optim
    assert (optim.name, optim.learning_rate, optim.warmup_steps, optim.grad_clip_norm) == ("adam", 2e-4, 5000, 1)
    assert (c.training.batch_size, c.training.num_steps, tuple(c.training.ema_decays)) == (128, 800_000, (0.9999,))
    assert (c.model.ch, tuple(c.model.ch_mult), c.model.num_res_blocks) == (128, (1, 2, 2, 2), 2)
    assert (tuple(c.model.attn_resolutions), c.model.dropout) == ((16,), 0.1)
    kwargs = model_kwargs(c, data.example_shape(c.data))
    n = models.count_params(lambda: models.create(c.model.name, rngs=nnx.Rngs(0), **kwargs))
    assert abs(n - 35.7e6) < 0.1e6, n
    betas = build_process(c).betas
    assert jax.numpy.allclose(jax.numpy.stack([betas[0], betas[-1]]), jax.numpy.array([1e-4, 0.02]))


def test_iddpm_cifar_is_nichol_and_dhariwal():
    c = load_config("iddpm_cifar")
    d = c.diffusion
    assert (d.schedule, d.num_timesteps, d.prediction, d.loss, d.vlb_weight) == ("cosine", 4000, "eps", "hybrid", 0.001)
    m = c.model
    assert (m.ch, tuple(m.ch_mult), m.num_res_blocks, tuple(m.attn_resolutions)) == (128, (1, 2, 2, 2), 3, (16, 8))
    assert (m.num_heads, m.dropout, m.use_scale_shift_norm, m.learn_sigma) == (4, 0.3, True, True)
    assert (c.optim.learning_rate, c.optim.warmup_steps, c.training.batch_size) == (1e-4, 0, 128)
    assert (c.sample.sampler, c.sample.variance) == ("ddpm", "learned_range")
    shape = data.example_shape(c.data)
    graphdef, init = build_model(c, shape)
    params = jax.eval_shape(init, jax.random.key(0))
    x, t = jax.ShapeDtypeStruct((1, *shape), jax.numpy.float32), jax.ShapeDtypeStruct((1,), jax.numpy.int32)
    out = jax.eval_shape(lambda p, x, t: model_apply(graphdef, p, x, t), params, x, t)
    assert out.shape == (1, 32, 32, 6)  # [eps, v]: twice the channels with the learned variance


def test_dit_xl2_imagenet256_is_peebles_and_xie_and_says_what_it_lacks():
    c = load_config("dit_xl2_imagenet256")
    assert (c.model.name, c.model.num_classes, c.model.learn_sigma) == ("DiT-XL/2", 1000, True)
    assert (c.diffusion.schedule, c.diffusion.num_timesteps, c.diffusion.loss) == ("linear", 1000, "hybrid")
    assert (c.optim.name, c.optim.learning_rate, c.optim.weight_decay, c.training.batch_size) == ("adamw", 1e-4, 0, 256)
    assert (tuple(c.training.ema_decays), c.training.label_dropout) == ((0.9999,), 0.1)
    s = c.sample
    assert (s.sampler, s.steps, s.variance, s.guidance_scale, s.guidance_channels) == ("ddpm", 250, "learned_range",
                                                                                      1.5, 3)
    kwargs = {k: v for k, v in c.model.items() if k != "name"} | {"image_size": 32, "in_channels": 4}
    n = models.count_params(lambda: models.create(c.model.name, rngs=nnx.Rngs(0), **kwargs))
    assert round(n / 1e6) == 675  # Table 4
    # SD-VAE latents of 256x256 images: 32x32x4 (f = 8), scaled by SD's 0.18215, read from the latent cache.
    assert data.example_shape(c.data) == (256, 256, 3) and c.latent.scale_factor == 0.18215
    assert c.latent.cache_dir is not None and c.latent.sample_posterior
    with pytest.raises(ConfigError, match=r"^latent.autoencoder_workdir: weights/sd-vae-ft-ema has no checkpoints/"):
        experiment.build(c)  # the SD-VAE is imported by the weight converter (see its docstring)


def test_ldm_cin256_is_rombach_et_al():
    from diffusion_jax.validation import validate_config

    c = load_config("ldm_cin256")
    assert (c.data.image_size, c.data.random_flip) == (256, False)
    # VQ-f4 latents of 256x256 images: 64x64x3 (Table 15), unscaled as LatentDiffusion's default.
    latent_shape = (c.data.image_size // 4, c.data.image_size // 4, 3)
    assert latent_shape == (64, 64, 3) and c.latent.autoencoder_workdir is not None and c.latent.scale_factor == 1.0
    d = c.diffusion
    assert (d.schedule, d.num_timesteps, d.prediction, d.loss) == ("scaled_linear", 1000, "eps", "simple")
    assert d.loss_weighting == "none"  # L_simple
    betas = build_process(c).betas  # sqrt-linear as LDM's, but SD's endpoints, not cin256's 0.0015 -> 0.0195
    assert jax.numpy.allclose(jax.numpy.stack([betas[0], betas[-1]]), jax.numpy.array([0.00085, 0.012]))
    o = c.optim
    assert (o.name, o.learning_rate, o.weight_decay, o.warmup_steps, o.grad_clip_norm) == ("adamw", 1e-4, 0.01, 0, 0)
    t = c.training
    assert (t.batch_size, t.num_steps, tuple(t.ema_decays), t.label_dropout) == (1200, 178_000, (), 0.1)
    m = c.model
    assert (m.name, m.ch, tuple(m.ch_mult), m.num_res_blocks, m.dropout) == ("unet", 192, (1, 2, 3, 5), 2, 0.0)
    assert (tuple(m.attn_resolutions), m.num_heads, m.context_dim, m.transformer_depth) == ((32, 16, 8), 1, 512, 1)
    assert (m.num_classes, m.learn_sigma, m.use_scale_shift_norm, m.resblock_updown) == (1000, False, False, False)
    s = c.sample
    assert (s.sampler, s.steps, s.eta, s.guidance_scale, s.ema_decay, s.clip_x0) == ("ddim", 250, 0.0, 1.5, None, None)
    kwargs = model_kwargs(c, latent_shape)
    n = models.count_params(lambda: models.create(m.name, rngs=nnx.Rngs(0), **kwargs))
    unet = n - (m.num_classes + 1) * 4 * m.ch  # less the label table (its null row included)
    assert round(unet / 1e4) == 40092, unet  # "DiffusionWrapper has 400.92 M params" (the cin256-v2 notebook)
    assert abs(n - 400e6) < 0.01 * 400e6, n  # Tables 3 and 10: 400M, rounded (Table 15 prints 395M)
    validate_config(c, num_devices=8, num_processes=1)
    check_config(c, build_process(c), latent_shape)
    with pytest.raises(ConfigError, match=r"^latent.autoencoder_workdir: .* has no checkpoints/"):
        experiment.build(c)  # no VQ-f4 first stage here (see the docstring)


def test_pd_configs_distill_their_teachers_network_in_halving_rounds():
    from diffusion_jax.distill import progressive
    from diffusion_jax.validation import validate_config

    digits, teacher = load_config("pd_digits"), load_config("ddpm_digits")
    assert digits.model == teacher.model and digits.data == teacher.data  # the student is ddpm_digits' U-Net
    assert (digits.diffusion.prediction, digits.diffusion.schedule) == ("v", "cosine")  # its README command line
    c = load_config("pd_cifar")
    for config, final_steps in ((digits, 4), (c, 4)):
        d = config.distill
        progressive.check_rounds(d.teacher_steps, d.rounds, d.steps_per_round, config.diffusion.num_timesteps,
                                 config.training.num_steps)
        assert d.teacher_steps >> d.rounds == final_steps == config.sample.steps
        assert (config.sample.sampler, config.sample.spacing, config.training.ema_decays) == ("ddim", "trailing", ())
        validate_config(config, num_devices=8, num_processes=1)
    m = c.model
    assert (m.ch, tuple(m.ch_mult), m.num_res_blocks, tuple(m.attn_resolutions), m.dropout) == (256, (1, 1, 1), 3,
                                                                                               (16, 8), 0.0)
    assert (c.diffusion.prediction, c.distill.teacher_steps, c.distill.steps_per_round) == ("x0", 8192, 50_000)
    assert (c.optim.learning_rate, c.optim.schedule, c.training.batch_size) == (5e-5, "linear", 128)
    with pytest.raises(ConfigError, match=r"^distill.teacher_workdir: runs/cifar_teacher has no checkpoints/"):
        experiment.build(c)


def test_edm_and_consistency_configs_hold_the_papers_settings():
    from diffusion_jax.distill import consistency
    from diffusion_jax.validation import validate_config

    edm, teacher = load_config("edm_cifar"), load_config("edm_digits")
    assert (edm.diffusion.process, edm.training.objective, edm.diffusion.p_mean, edm.diffusion.p_std) == (
        "edm", "edm", -1.2, 1.2)
    assert (edm.sample.sampler, edm.sample.steps) == ("heun", 18)  # 35 NFE
    m = edm.model
    assert (m.ch, tuple(m.ch_mult), m.num_res_blocks, m.dropout) == (128, (2, 2, 2), 4, 0.13)
    assert (edm.optim.learning_rate, edm.training.batch_size) == (1e-3, 512)
    cd, ict, cd_digits, ct_digits = (load_config(n) for n in ("cd_cifar", "ict_cifar", "cd_digits", "ct_digits"))
    for config in (cd, ict, cd_digits, ct_digits):
        assert (config.diffusion.preconditioning, config.sample.sampler, config.sample.steps) == (
            "consistency", "consistency", 1)
        consistency.check_options(config.consistency)
        validate_config(config, num_devices=8, num_processes=1)
    assert {k: v for k, v in cd.model.items() if k != "dropout"} == {k: v for k, v in edm.model.items()
                                                                       if k != "dropout"}  # the teacher's U-Net
    assert (cd.consistency.num_levels, cd.consistency.target_ema_decay, cd.consistency.teacher_workdir) == (
        18, 0.95, "runs/edm_cifar")
    assert cd.consistency.target_ema_decay in cd.training.ema_decays
    c = ict.consistency
    assert (c.curriculum, c.s0, c.s1, c.distance, c.level_sampling, c.weighting, c.target_ema_decay) == (
        "ict", 10, 1280, "pseudo_huber", "lognormal", "inverse_gap", None)
    assert (ict.model.dropout, ict.optim.learning_rate, ict.training.batch_size) == (0.3, 1e-4, 1024)
    assert cd_digits.model == teacher.model and cd_digits.consistency.teacher_workdir == "runs/edm_digits"
    with pytest.raises(ConfigError, match=r"^consistency.teacher_workdir: runs/edm_cifar has no checkpoints/"):
        experiment.build(cd)
