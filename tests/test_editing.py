"""Editing (`diffusion_jax.editing`, `diffusion_jax.inpaint`) against closed forms on correlated Gaussian data:
the conditional denoiser draws the exact conditional, replacement and RePaint keep the known pixels and
approximate it, SDEdit draws the posterior of the noised image, DDIM inversion from t0 round-trips."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import diffusion_jax as dj
from diffusion_jax import editing, inpaint
from diffusion_jax.errors import ConfigError

RNG = np.random.default_rng(0)
D = 4
FACTOR = RNG.normal(size=(D, D))
COV = FACTOR @ FACTOR.T / D + 0.05 * np.eye(D)  # correlated: the known pixels say much about the others
MEAN = RNG.normal(size=D)


def exact_x0(process):
    """E[x_0 | x_t] of N(MEAN, COV) data: MEAN + α COV (α² COV + σ² I)⁻¹ (x_t - α MEAN)."""
    cov, mean = jnp.asarray(COV, jnp.float32), jnp.asarray(MEAN, jnp.float32)

    def model_fn(x_t, t):
        alpha, sigma = process.alpha_sigma(t)
        alpha, sigma = jnp.asarray(alpha, jnp.float32)[0], jnp.asarray(sigma, jnp.float32)[0]
        gain = alpha * cov @ jnp.linalg.inv(alpha**2 * cov + sigma**2 * jnp.eye(D))
        return mean + (x_t - alpha * mean) @ gain.T

    return model_fn


def test_the_conditional_denoiser_samples_the_exact_conditional_gaussian():
    schedule = dj.schedules.get("cosine", 1000)
    known_index = np.array([0, 2])
    y = np.zeros(D)
    y[known_index] = [1.2, -0.7]
    mask = np.zeros(D)
    mask[known_index] = 1.0
    u = np.array([1, 3])  # the closed form: x_u | x_k = y ~ N(μ_u + Σ_uk Σ_kk⁻¹ (y - μ_k), Σ_uu - Σ_uk Σ_kk⁻¹ Σ_ku)
    gain = COV[np.ix_(u, known_index)] @ np.linalg.inv(COV[np.ix_(known_index, known_index)])
    want_mean = MEAN[u] + gain @ (y[known_index] - MEAN[known_index])
    want_cov = COV[np.ix_(u, u)] - gain @ COV[np.ix_(known_index, u)]
    model_fn = inpaint.conditional_denoiser(exact_x0(schedule), schedule, "x0", jnp.asarray(y, jnp.float32),
                                            jnp.asarray(mask, jnp.float32), cg_steps=2)
    n = 16384
    x_T = jax.random.normal(jax.random.key(0), (n, D))
    for name, options in (("ddpm", {"steps": 1000}), ("ddim", {"steps": 200, "eta": 0.0})):
        sample = jax.jit(functools.partial(dj.samplers.get(name), model_fn, schedule, prediction="x0", clip_x0=None,
                                           **options))
        x0 = np.asarray(sample(jax.random.key(1), x_T))
        np.testing.assert_allclose(x0[:, known_index], np.broadcast_to(y[known_index], (n, 2)), atol=1e-5)
        sem = np.sqrt(np.diag(want_cov) / n)
        assert np.all(np.abs(x0[:, u].mean(0) - want_mean) < 5 * sem), (name, x0[:, u].mean(0), want_mean)
        np.testing.assert_allclose(np.cov(x0[:, u].T), want_cov, atol=0.03, err_msg=name)


def test_with_nothing_known_it_is_the_unconditional_denoiser():
    schedule = dj.schedules.get("linear", 1000)
    model_fn = exact_x0(schedule)
    free = inpaint.conditional_denoiser(model_fn, schedule, "x0", jnp.zeros(D), jnp.zeros(D))
    x = jax.random.normal(jax.random.key(2), (8, D))
    t = jnp.full((8,), 500)
    np.testing.assert_allclose(free(x, t), model_fn(x, t), atol=1e-6)


KNOWN = np.array([0, 2])
UNKNOWN = np.array([1, 3])
Y = np.array([1.2, 0.0, -0.7, 0.0])
MASK = np.array([1.0, 0.0, 1.0, 0.0])


def conditional_moments():
    """x_u | x_k = y of N(MEAN, COV): (mean, covariance)."""
    gain = COV[np.ix_(UNKNOWN, KNOWN)] @ np.linalg.inv(COV[np.ix_(KNOWN, KNOWN)])
    mean = MEAN[UNKNOWN] + gain @ (Y[KNOWN] - MEAN[KNOWN])
    return mean, COV[np.ix_(UNKNOWN, UNKNOWN)] - gain @ COV[np.ix_(KNOWN, UNKNOWN)]


def edited_sample(name, schedule, edit, n, **options):
    sample = jax.jit(functools.partial(dj.samplers.get(name), exact_x0(schedule), schedule, prediction="x0",
                                       clip_x0=None, return_info=True, edit=edit, **options))
    x0, info = sample(jax.random.key(1), jax.random.normal(jax.random.key(0), (n, D)))
    return np.asarray(x0), int(info.nfe)


def test_repaint_order_goes_down_jumps_back_and_ends_clean():
    np.testing.assert_array_equal(editing.repaint_order(4, 2, 2), [3, 2, 1, 0, -1, -2, 1, 0])
    np.testing.assert_array_equal(editing.repaint_order(5, 1, 1), [4, 3, 2, 1, 0])
    order = editing.repaint_order(20, 5, 3)
    level = 20  # time index: reverse step i takes time i + 1 to i; undoing it, back
    for op in order:
        level = op if op >= 0 else level + 1
        assert (op >= 0 and level == op) or (op < 0 and level == -op)
        assert 0 <= level <= 20
    assert level == 0 and order[-1] == 0
    assert (order >= 0).sum() == 20 + 3 * 2 * 5  # 3 jump points (t = 0, 5, 10), 2 extra passes of 5 steps


def test_imputation_returns_the_known_pixels_under_every_stepping_sampler():
    schedule = dj.schedules.get("cosine", 1000)
    edit = editing.Edit(known=jnp.asarray(Y, jnp.float32), mask=jnp.asarray(MASK, jnp.float32))
    for name, options in (("ddpm", {"steps": 8}), ("ddim", {"steps": 8}), ("dpm_solver++", {"steps": 8}),
                          ("heun", {"steps": 4}), ("pc", {"steps": 4}), ("consistency", {"steps": 3})):
        x0, nfe = edited_sample(name, schedule, edit, 16, **options)
        np.testing.assert_allclose(x0[:, KNOWN], np.broadcast_to(Y[KNOWN], (16, 2)), atol=1e-6, err_msg=name)
        assert np.isfinite(x0).all(), name


def test_replacement_is_biased_and_repaint_and_the_conditional_denoiser_close_the_gap():
    """score_sde's replacement conditions on a noisy copy of y; RePaint's resampling harmonises the unknown
    part; the conditional denoiser is exact (above). On the 4-D Gaussian with y far in the tail and 100 ancestral
    steps, the unknown means' error is 2.35 by replacement, 0.87 by RePaint (j = 1, r = 10), 1.29 (j = 10, r = 5)."""
    schedule = dj.schedules.get("cosine", 1000)
    want_mean, _ = conditional_moments()
    known, mask = jnp.asarray(Y, jnp.float32), jnp.asarray(MASK, jnp.float32)
    n = 4096
    replaced, nfe = edited_sample("ddpm", schedule, editing.Edit(known=known, mask=mask), n, steps=100)
    assert nfe == 100
    repainted, nfe = edited_sample("ddpm", schedule, editing.Edit(known=known, mask=mask, jump=1, resamples=10), n,
                                   steps=100)
    assert nfe == 100 + 99 * 9  # a jump back at every level but the top, 9 more times
    error_replace = np.abs(replaced[:, UNKNOWN].mean(0) - want_mean).max()
    error_repaint = np.abs(repainted[:, UNKNOWN].mean(0) - want_mean).max()
    sem = np.sqrt(COV[UNKNOWN, UNKNOWN].max() / n)
    assert error_replace > 10 * sem and error_repaint < 0.5 * error_replace, (error_replace, error_repaint)


def test_repaint_refuses_samplers_it_cannot_undo():
    schedule = dj.schedules.get("cosine", 1000)
    edit = editing.Edit(known=jnp.asarray(Y, jnp.float32), mask=jnp.asarray(MASK, jnp.float32), jump=2, resamples=2)
    for name in ("dpm_solver++", "consistency", "heun"):
        with pytest.raises(ConfigError, match="sample.inpaint_method: 'repaint' undoes steps"):
            edited_sample(name, schedule, edit, 4, steps=8)


def test_sdedit_samples_the_posterior_of_the_noised_image():
    """From x_t0 = α y + σ z, exact ancestral sampling draws p(x_0 | x_t0); over z that is Gaussian with mean
    μ + K α (y - μ) and covariance Cov[x_0 | x_t0] + σ² K Kᵀ, K = α Σ (α² Σ + σ² I)⁻¹ (Meng et al. 2021, §3)."""
    schedule = dj.schedules.get("cosine", 1000)
    t0 = 0.4
    truncated = editing.truncate(schedule, t0)
    assert truncated.num_timesteps == 400 and int(truncated.timesteps[-1]) == 399
    alpha, sigma = float(schedule.alpha[399]), float(schedule.sigma[399])
    gain = alpha * COV @ np.linalg.inv(alpha**2 * COV + sigma**2 * np.eye(D))
    init = np.array([1.5, -1.0, 0.5, 2.0])
    want_mean = MEAN + gain @ (alpha * (init - MEAN))
    want_cov = (COV - gain @ (alpha * COV)) + sigma**2 * gain @ gain.T
    n = 16384
    x0, nfe = edited_sample("ddpm", truncated, editing.Edit(init=jnp.asarray(init, jnp.float32)), n, steps=None)
    assert nfe == 400
    sem = np.sqrt(np.diag(want_cov) / n)
    assert np.all(np.abs(x0.mean(0) - want_mean) < 5 * sem), (x0.mean(0), want_mean)
    np.testing.assert_allclose(np.cov(x0.T), want_cov, atol=0.03)


def test_truncate_cuts_every_kind_of_process_and_names_t0():
    vp = dj.sde.VPSDE()
    assert editing.truncate(vp, 0.5).t_max == pytest.approx(vp.t_min + 0.5 * (vp.t_max - vp.t_min))
    assert editing.truncate(dj.sde.EDM(), 0.25).sigma_max == pytest.approx(0.002 + 0.25 * (80.0 - 0.002))
    assert editing.truncate(dj.schedules.get("linear", 1000), 0.0001).num_timesteps == 1
    for bad in (0.0, 1.5, -0.2):
        with pytest.raises(ConfigError, match=r"sample.t0: got .*in \(0, 1\]"):
            editing.truncate(vp, bad)


def test_ddim_inversion_from_t0_regenerates_the_image():
    schedule = dj.schedules.get("cosine", 1000)
    options = editing.EditOptions(t0=0.6, invert=True, steps=100, spacing="uniform")
    process = options.process(schedule)
    model_fn = exact_x0(schedule)
    init = jnp.asarray(MEAN + RNG.normal(size=(8, D)) @ np.linalg.cholesky(COV).T, jnp.float32)  # data
    x_T = options.invert_fn(model_fn, process, init, "x0")
    again = dj.samplers.ddim_sample(model_fn, process, jax.random.key(0), x_T, steps=100, prediction="x0",
                                    clip_x0=None)
    np.testing.assert_allclose(again, init, atol=0.02)
    assert np.abs(np.asarray(x_T) - np.asarray(init)).max() > 0.1  # it did move


def test_masks_and_their_errors(tmp_path):
    box = editing.make_mask("box", (8, 8, 1), 2)
    assert box.shape == (2, 8, 8, 1) and box.sum() == 2 * (64 - 16)
    half = editing.make_mask("half", (8, 8, 3), 1)
    assert half[0, :, :4].min() == 1 and half[0, :, 4:].max() == 0
    strokes = editing.make_mask("strokes", (16, 16, 1), 3, seed=1)
    assert 0 < strokes.mean() < 1 and not np.array_equal(strokes[0], strokes[1])
    np.testing.assert_array_equal(strokes, editing.make_mask("strokes", (16, 16, 1), 3, seed=1))
    Image.fromarray(np.full((12, 12), 255, np.uint8)).save(tmp_path / "mask.png")
    with pytest.raises(ConfigError, match=r"sample.inpaint_mask: .*mask.png is \(12, 12\); this model makes 8x8"):
        editing.make_mask(str(tmp_path / "mask.png"), (8, 8, 1), 1)
    Image.fromarray(np.where(np.arange(64).reshape(8, 8) < 32, 255, 0).astype(np.uint8)).save(tmp_path / "top.png")
    top = editing.make_mask(str(tmp_path / "top.png"), (8, 8, 1), 1)
    assert top[0, :4].min() == 1 and top[0, 4:].max() == 0
    with pytest.raises(ConfigError, match="sample.inpaint_mask: 'circle' is neither one of"):
        editing.make_mask("circle", (8, 8, 1), 1)
    np.savez(tmp_path / "images.npz", arr_0=np.zeros((3, 16, 16, 1), np.uint8))
    with pytest.raises(ConfigError, match=r"sample.init_image: .*images.npz holds images of \(16, 16, 1\); this mo"):
        editing.load_images(str(tmp_path / "images.npz"), "sample.init_image", 4, (8, 8, 1), None)
