"""Sample mode: every registered sampler, its options and guidance, chosen from the config alone."""

import numpy as np
import pytest
from conftest import tiny_digits_config
from PIL import Image
from test_training import run_main

import diffusion_jax as dj
from diffusion_jax.errors import ConfigError
from diffusion_jax.sample import sample
from diffusion_jax.training.loop import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits_data_dir):
    """A class-conditional tiny digits model trained for 2 steps (so every sampler has a checkpoint)."""
    workdir = tmp_path_factory.mktemp("sample_mode")
    config = tiny_digits_config(digits_data_dir)
    config.model.num_classes = 10
    config.training.update(num_steps=2, sample_every=0)
    train(config, workdir)
    return config, workdir


# Each entry: the sampler and the config.sample fields it reads (--config.sample.<field>=...).
CASES = {
    "ddpm": dict(steps=6, variance="fixed_large"),
    "ddim": dict(steps=6, eta=0.5, spacing="trailing"),
    "dpm_solver++": dict(steps=6, order=3, spacing="logsnr", max_step_ratio=3.0),
    "euler": dict(steps=4, s_churn=1.0),
    "heun": dict(steps=4, rho=5.0),
    "pc": dict(steps=4, predictor="euler_maruyama", snr=0.1, n_corrector=2),
    "langevin": dict(steps=3, n_steps_each=2, step_lr=1e-4),
    "ode": dict(rtol=1e-2, atol=1e-2, ode_solver="bosh3"),
    "consistency": dict(steps=3, spacing="karras"),  # on a diffusion model: denoise, re-noise (Algorithm 1)
}


# Samplers that need a run of their own kind, and the test that runs them in sample mode.
OTHER_RUNS = {"meanflow": "test_meanflow.py::test_a_meanflow_run_trains_samples_in_one_step_and_loads"}


def test_every_registered_sampler_has_a_case():
    assert sorted(CASES | OTHER_RUNS) == dj.samplers.names()


@pytest.mark.parametrize("name", sorted(CASES))
def test_sample_mode_runs_every_sampler(trained, name):
    config, workdir = trained
    config = config.copy_and_resolve_references()
    config.sample.update(sampler=name, num_samples=8, batch_size=8, guidance_scale=2.0, **CASES[name])
    png, npz = sample(config, workdir)
    images = np.load(npz)["arr_0"]
    assert images.shape == (8, 8, 8, 1) and images.dtype == np.uint8 and png.stat().st_size > 0


def test_bad_sampler_option_fails_before_sampling(trained):
    config, workdir = trained
    config = config.copy_and_resolve_references()
    config.sample.update(sampler="pc", predictor="leapfrog")
    with pytest.raises(ConfigError, match="sample.predictor: unknown predictor 'leapfrog'"):
        sample(config, workdir)


def test_cli_selects_sampler_steps_and_guidance(trained, tmp_path):
    """The issue's command line, with no code change: DPM-Solver++ at 20 steps, guidance scale 2."""
    config, workdir = trained
    result = run_main(
        "--config=configs/ddpm_digits.py",
        f"--workdir={workdir}",
        "--mode=sample",
        f"--config.data.data_dir={config.data.data_dir}",
        "--config.data.image_size=8",
        "--config.model.ch=8",
        "--config.model.ch_mult=(1,2)",
        "--config.model.num_res_blocks=1",
        "--config.model.attn_resolutions=(4,)",
        "--config.model.num_classes=10",
        "--config.diffusion.num_timesteps=100",
        "--config.training.ema_decays=(0.9,0.99)",
        "--config.sample.ema_decay=0.99",
        "--config.sample.num_samples=8",
        "--config.sample.batch_size=8",
        "--config.sample.sampler=dpm_solver++",
        "--config.sample.steps=20",
        "--config.sample.guidance_scale=2",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # log-SNR spacing rounds 20 levels to this T = 100 schedule's timesteps; two coincide and are dropped.
    assert "dpm_solver++ used 18 network evaluations per sample" in result.stderr, result.stderr[-2000:]


def test_sample_mode_inpaints_with_repaint_keeping_the_known_pixels(trained):
    from diffusion_jax import editing
    from diffusion_jax.data import load_split

    config, workdir = trained
    config = config.copy_and_resolve_references()
    config.sample.update(sampler="ddpm", steps=6, num_samples=8, batch_size=8, inpaint_image="test",
                         inpaint_mask="box", inpaint_method="repaint", repaint_jump=2, repaint_resamples=2)
    _, npz = sample(config, workdir)
    images, known = np.load(npz)["arr_0"], load_split(config.data, "test")[0][:8]
    mask = editing.make_mask("box", images.shape[1:], 8) == 1
    np.testing.assert_array_equal(images[mask], known[mask])
    assert np.any(images[~mask] != known[~mask])
    edits = Image.open(npz.parent / "edits_2.png")  # rows of input | mask | output
    assert edits.size == (3 * 9 + 1, 8 * 9 + 1)


def test_sample_mode_solves_an_inverse_problem_consistently_with_its_measurement(trained):
    """2x super-resolution of the test digits from a noisy 4x4 measurement (`config.inverse`): even a 2-step model's
    samples, downsampled, are far closer to the measured images than its free samples are."""
    from diffusion_jax import inverse
    from diffusion_jax.data import load_split

    config, workdir = trained
    config = config.copy_and_resolve_references()
    config.sample.update(sampler="ddim", steps=4, num_samples=8, batch_size=8)
    clean = load_split(config.data, "test")[0][:8].astype(np.float32) / 127.5 - 1.0
    down = inverse.downsample(2).apply

    def misfit() -> float:
        _, npz = sample(config, workdir)
        images = np.load(npz)["arr_0"].astype(np.float32) / 127.5 - 1.0
        return float(np.abs(np.asarray(down(images)) - np.asarray(down(clean))).mean())

    free = misfit()
    config.inverse.update(operator="downsample", factor=2, noise_std=0.02, method="tweedie")
    solved = misfit()
    assert solved < 0.5 * free, (solved, free)
    npz = workdir / "samples" / "samples_2.npz"
    assert Image.open(npz.parent / "edits_2.png").size == (3 * 9 + 1, 8 * 9 + 1)  # clean | measured | output
    for fields, message in (({"operator": "blurr"}, "inverse.operator: unknown operator 'blurr'"),
                            ({"factor": 3}, "inverse.factor: 3 does not divide the 8x8 images"),
                            ({"method": "dsp"}, "inverse.method: unknown method 'dsp'")):
        bad = config.copy_and_resolve_references()
        bad.inverse.update(fields)
        with pytest.raises(ConfigError, match=message):
            sample(bad, workdir)


def test_sample_mode_sdedit_from_a_small_t0_stays_near_the_image_and_inversion_runs(trained):
    from diffusion_jax.data import load_split

    config, workdir = trained
    config = config.copy_and_resolve_references()
    config.sample.update(sampler="ddim", steps=4, num_samples=8, batch_size=8, init_image="test", t0=0.05)
    _, npz = sample(config, workdir)
    images, init = np.load(npz)["arr_0"].astype(float), load_split(config.data, "test")[0][:8].astype(float)
    assert np.abs(images - init).mean() < 8  # uint8 levels: the 2-step model barely moves a barely noised image
    config.sample.update(t0=0.5, invert=True, guidance_scale=2.0)
    _, npz = sample(config, workdir)
    assert np.load(npz)["arr_0"].shape == (8, 8, 8, 1)


def test_editing_options_fail_with_one_line_errors(trained, tmp_path):
    from diffusion_jax import editing

    config, workdir = trained
    np.savez(tmp_path / "mask.npz", arr_0=np.ones((16, 16), np.uint8))
    cases = [
        (dict(inpaint_image="test", inpaint_mask=str(tmp_path / "mask.npz")), r"sample.inpaint_mask: .* is \(16, 16\)"),
        (dict(inpaint_image="test", inpaint_mask="box", inpaint_method="blend"), "sample.inpaint_method: unknown"),
        (dict(inpaint_image="test"), "sample.inpaint_mask: inpainting needs both"),
        (dict(init_image="test", t0=1.5), r"sample.t0: got 1.5; .*\(0, 1\]"),
        (dict(t0=0.5), "sample.t0: SDEdit and DDIM inversion edit an image; set sample.init_image"),
        (dict(init_image="test", sampler="ode"), "sample.sampler: 'ode' .* takes no chain edits"),
    ]
    for n, (fields, message) in enumerate(cases):
        edited = config.copy_and_resolve_references()
        edited.sample.update(num_samples=8, batch_size=8, **fields)
        with pytest.raises(ConfigError, match=message):
            if n == 0:  # through sample mode, before anything is drawn
                sample(edited, workdir)
            else:  # what sample mode checks first: the options, then the images
                editing.EditOptions.from_config(edited, {})
                editing.sample_inputs(edited, (8, 8, 1), 8)
