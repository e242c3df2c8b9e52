"""Progressive distillation: the round target against two independent DDIM steps, the round plan,
and a distillation run that hands the teacher on between rounds and resumes mid-round exactly."""

import json
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import assert_build_errors, changed, tiny_digits_config

import diffusion_jax as dj
from diffusion_jax import exact, schedules
from diffusion_jax.distill import consistency, progressive
from diffusion_jax.errors import ConfigError
from diffusion_jax.training import experiment
from diffusion_jax.training.checkpoint import Checkpointer
from diffusion_jax.training.loop import train


def test_the_round_target_is_where_two_teacher_ddim_steps_land():
    schedule = schedules.cosine(100)
    mixture = exact.ring(4, std=0.1)
    teacher_fn = exact.x0_model(mixture, schedule)  # the exact E[x_0 | x_t]: prediction 'x0'
    num_steps, batch = 4, 64
    rng = np.random.default_rng(0)
    i = rng.integers(1, num_steps + 1, batch)  # student levels 1..N
    trailing = schedules.space_timesteps(100, 2 * num_steps, "trailing")  # the teacher's 2N levels
    assert np.array_equal(progressive.level(schedule, jnp.asarray(i), jnp.int32(num_steps)).t, trailing[2 * i - 1])

    # Two DDIM steps (Song et al. Eq. 12, eta = 0) in float64, with x_0 and eps written out.
    a = np.sqrt(np.asarray(schedule.alphas_cumprod, np.float64))
    s = np.sqrt(1.0 - a**2)

    def coefficients(j: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # teacher level j of 2N
        t = trailing[np.maximum(j, 1) - 1]
        return t, np.where(j == 0, 1.0, a[t])[:, None], np.where(j == 0, 0.0, s[t])[:, None]

    z_t = np.empty((batch, 2))
    t, a_t, s_t = coefficients(2 * i)
    z_t[:] = a_t * mixture.sample(rng, batch) + s_t * rng.standard_normal((batch, 2))
    z = z_t
    for j in (2 * i, 2 * i - 1):
        t, a_j, s_j = coefficients(j)
        _, a_next, s_next = coefficients(j - 1)
        x0 = np.asarray(teacher_fn(jnp.asarray(z, jnp.float32), jnp.asarray(t)), np.float64)
        eps = (z - a_j * x0) / s_j
        z = a_next * x0 + s_next * eps
    target = progressive.distillation_target(teacher_fn, schedule, jnp.asarray(z_t, jnp.float32), jnp.asarray(i),
                                             jnp.int32(num_steps), "x0")
    _, a_end, s_end = coefficients(2 * i - 2)
    one_student_step = a_end * np.asarray(target) + s_end / s_t * (z_t - a_t * np.asarray(target))
    np.testing.assert_allclose(one_student_step, z, atol=2e-4)
    assert np.any(i == 1)  # the last step lands on clean data: the target is the teacher's second x̂_0
    np.testing.assert_allclose(np.asarray(target)[i == 1], z[i == 1], atol=2e-4)


def test_rounds_halve_the_steps_and_bad_plans_name_the_field():
    steps = [int(progressive.student_steps(jnp.int32(k), 16, 5)) for k in (0, 4, 5, 14, 15, 19)]
    assert steps == [8, 8, 4, 2, 1, 1]
    progressive.check_rounds(16, 4, 5, 100, 20)
    for args, field in [((12, 2, 5, 100, 10), "distill.teacher_steps: .* power of two"),
                        ((256, 2, 5, 100, 10), "distill.teacher_steps: 256 DDIM steps need distinct"),
                        ((16, 5, 5, 100, 25), "distill.rounds: 5 halvings .* at most 4"),
                        ((16, 2, 5, 100, 11), r"training.num_steps: 11; .* at most distill.rounds × ")]:
        with pytest.raises(ConfigError, match="^" + field):
            progressive.check_rounds(*args)


def distill_config(data_dir: str, teacher_workdir) -> ml_collections.ConfigDict:
    config = tiny_digits_config(data_dir)
    config.diffusion.prediction = "v"
    config.training.update(objective="distill", num_steps=4, checkpoint_every=1, keep_checkpoints=None,
                           sample_every=4, log_every=1, ema_decays=(0.9,))
    config.distill.update(teacher_workdir=str(teacher_workdir), teacher_steps=8, rounds=2, steps_per_round=2)
    config.sample.update(steps=2, spacing="trailing", ema_decay=None)
    return config


@pytest.fixture(scope="module")
def teacher_workdir(tmp_path_factory, digits_data_dir):
    config = tiny_digits_config(digits_data_dir)
    config.diffusion.prediction = "v"
    config.training.update(num_steps=1, checkpoint_every=1, sample_every=0)
    workdir = tmp_path_factory.mktemp("teacher")
    train(config, workdir)
    return workdir


def test_distillation_hands_the_teacher_on_and_resumes_mid_round_exactly(teacher_workdir, digits_data_dir, tmp_path):
    config = distill_config(digits_data_dir, teacher_workdir)
    final = train(config, tmp_path / "straight")
    teacher = dj.load(teacher_workdir).params  # the EMA the teacher samples with
    checkpoints = Checkpointer(tmp_path / "straight" / "checkpoints")
    abstract = experiment.build(config).abstract_state
    at = {step: checkpoints.restore_step(step, abstract) for step in (1, 2)}
    checkpoints.close()
    same = jax.tree.map(np.array_equal, at[1].teacher, teacher)
    assert all(jax.tree.leaves(same))  # round 0: the loaded teacher, whose copy the student started as
    handed_on = jax.tree.map(np.array_equal, final.teacher, at[2].params)
    assert all(jax.tree.leaves(handed_on))  # round 1's teacher is the student after round 0
    assert (tmp_path / "straight" / "samples" / "samples_4.png").exists()

    # Killed after step 3 (mid-round), resumed: the same step-4 state.
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed", ignore=shutil.ignore_patterns("4", "lock.json"))
    resumed = train(distill_config(digits_data_dir, teacher_workdir), tmp_path / "resumed")
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, resumed.params, final.params)))


def test_a_teacher_that_is_not_the_student_is_a_one_line_error(teacher_workdir, digits_data_dir, tmp_path):
    config = distill_config(digits_data_dir, tmp_path / "nowhere")
    with pytest.raises(ConfigError, match=r"^distill.teacher_workdir: .*nowhere has no checkpoints/"):
        experiment.build(config)
    config = distill_config(digits_data_dir, teacher_workdir)
    config.model.ch = 16
    with pytest.raises(ConfigError, match=r"^model.ch: this run continues distill.teacher_workdir .* network, "
                                          r"which has 8; this config 16"):
        experiment.build(config)
    config = distill_config(digits_data_dir, teacher_workdir)
    config.diffusion.prediction = "eps"
    with pytest.raises(ConfigError, match=r"^diffusion.prediction: the teacher .* predicts 'v'"):
        experiment.build(config)
    config = distill_config(digits_data_dir, teacher_workdir)
    config.data.image_size = 16
    config.model.attn_resolutions = (8,)
    with pytest.raises(ConfigError, match=r"^data.image_size: .*teacher_workdir .* models \(8, 8, 1\) examples"):
        experiment.build(config)


# --- consistency models ---------------------------------------------------------------------------------


def gaussian_consistency(s: float, grid: consistency.Grid = consistency.CIFAR10):
    """The exact consistency function of data N(0, s² I): the PF-ODE scales x by sqrt(s² + σ²)."""
    return lambda x, sigma: x * jnp.sqrt((s**2 + grid.sigma_min**2) / (s**2 + sigma**2))[:, None]


def test_the_consistency_function_is_the_identity_at_sigma_min_exactly():
    network = lambda x, t: 3.0 * x + jnp.sin(t)[:, None] + 1.0  # noqa: E731  any F, finite
    f = consistency.consistency_function(network)
    x = jax.random.normal(jax.random.key(0), (16, 5))
    assert np.array_equal(f(x, jnp.full((16,), consistency.CIFAR10.sigma_min)), x)
    assert not np.allclose(f(x, jnp.full((16,), 1.0)), x)
    sigmas = consistency.karras_sigmas(18)
    np.testing.assert_allclose([sigmas[0], sigmas[-1]], [0.002, 80.0], rtol=1e-5)
    assert np.all(np.diff(sigmas) > 0)
    traced = jax.jit(lambda n: consistency.sigma_at(jnp.arange(18), n))(jnp.int32(18))
    np.testing.assert_allclose(traced, sigmas, rtol=1e-6)


def test_consistency_losses_vanish_for_the_exact_consistency_function():
    s = 0.5
    x0 = s * jax.random.normal(jax.random.key(0), (512, 4))
    exact_f = gaussian_consistency(s)
    identity = lambda x, sigma: x  # noqa: E731  violates consistency
    teacher = lambda x, sigma: x * (s**2 / (s**2 + sigma**2))[:, None]  # noqa: E731  E[x0 | x_σ] of N(0, s²)
    key = jax.random.key(1)
    cd_exact = consistency.consistency_loss(exact_f, exact_f, x0, key, 18, teacher_denoise=teacher)[0]
    cd_wrong = consistency.consistency_loss(identity, identity, x0, key, 18, teacher_denoise=teacher)[0]
    assert cd_exact < 1e-3 * cd_wrong  # Heun's error only
    # One Heun step of the teacher's ODE against its closed-form solution.
    x = jax.random.normal(key, (8, 4)) * 3.0
    one = consistency.heun_step(teacher, x, jnp.full((8,), 3.0), jnp.full((8,), 2.5))
    np.testing.assert_allclose(one, x * np.sqrt((s**2 + 2.5**2) / (s**2 + 3.0**2)), rtol=2e-3)
    ct, aux = consistency.consistency_loss(exact_f, exact_f, x0, key, 1281, distance_kind="pseudo_huber",
                                           level_sampling="lognormal", weighting="inverse_gap")
    assert np.isfinite(ct) and aux["distance"].shape == (512,)


def test_ict_curriculum_and_lognormal_levels():
    n = [int(consistency.ict_num_levels(jnp.int32(k), 1000)) for k in (0, 124, 125, 874, 875, 999)]
    assert n == [11, 11, 21, 641, 1281, 1281]  # s0 = 10 doubling every K' = 125 steps up to s1 = 1280
    probs = consistency.lognormal_level_probs(jnp.int32(11), 1281)
    assert probs.shape == (1280,) and abs(float(probs.sum()) - 1.0) < 1e-5 and float(probs[10:].sum()) == 0.0
    assert int(np.argmax(probs)) in range(2, 8)  # P_mean = -1.1: mass in the middle of the σ range
    with pytest.raises(ConfigError, match="^consistency.distance: unknown distance 'lpips'"):
        consistency.check_distance("lpips")


def test_consistency_sampling_in_one_and_two_steps_draws_the_data_distribution():
    s = 0.5
    process = dj.sde.EDM()
    f = gaussian_consistency(s)
    x_T = process.prior_sample(jax.random.key(0), (20000, 2))
    sample = dj.samplers.get("consistency")
    one, info = sample(f, process, jax.random.key(1), x_T, steps=1, return_info=True)
    two = sample(f, process, jax.random.key(1), x_T, sigmas=(80.0, 0.8))
    karras, info_karras = sample(f, process, jax.random.key(1), x_T, steps=2, return_info=True)
    assert int(info.nfe) == 1 and int(info_karras.nfe) == 2
    assert not np.allclose(karras, one)  # the second level is above σ_min, where f is not the identity
    for x in (one, two, karras):
        np.testing.assert_allclose(np.std(np.asarray(x), axis=0), s, rtol=0.03)
    with pytest.raises(ConfigError, match=r"^sample.sigmas: \(0.8, 80.0\); expected model times, noisiest first"):
        sample(f, process, jax.random.key(1), x_T, sigmas=(0.8, 80.0))


# --- consistency distillation and training as runs -------------------------------------------------------


def consistency_config(data_dir: str, teacher_workdir=None, **options) -> ml_collections.ConfigDict:
    config = tiny_digits_config(data_dir)
    config.diffusion.update(process="edm", preconditioning="consistency", prediction="x0")
    config.training.update(objective="consistency", num_steps=4, checkpoint_every=1, keep_checkpoints=None,
                           sample_every=0, log_every=1, ema_decays=(0.5, 0.9))
    config.consistency.update(teacher_workdir=None if teacher_workdir is None else str(teacher_workdir),
                              num_levels=6, **options)
    config.sample.update(sampler="consistency", steps=2, clip_x0=None, ema_decay=0.9)
    config.eval.metrics = ("digits",)
    return config


@pytest.fixture(scope="module")
def edm_teacher_workdir(tmp_path_factory, digits_data_dir):
    config = consistency_config(digits_data_dir)
    config.diffusion.preconditioning = "edm"
    config.training.update(objective="edm", num_steps=1, sample_every=0)
    workdir = tmp_path_factory.mktemp("edm_teacher")
    train(config, workdir)
    return workdir


def test_consistency_distillation_starts_from_an_edm_teacher_targets_its_ema_and_resumes_exactly(
    edm_teacher_workdir, digits_data_dir, tmp_path
):
    config = consistency_config(digits_data_dir, edm_teacher_workdir, target_ema_decay=0.5)
    config.training.sample_every = 4
    objective = experiment.build(config).objective
    assert objective.initial_params is objective.teacher and objective.metrics == ("num_levels",)
    final = train(config, tmp_path / "straight")
    checkpoints = Checkpointer(tmp_path / "straight" / "checkpoints")
    first = checkpoints.restore_step(1, experiment.build(config).abstract_state)
    checkpoints.close()
    teacher = dj.load(edm_teacher_workdir).params
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, first.teacher, teacher)))  # frozen, checkpointed
    assert (tmp_path / "straight" / "samples" / "samples_4.png").exists()  # the 2-step consistency sampler

    shutil.copytree(tmp_path / "straight", tmp_path / "resumed", ignore=shutil.ignore_patterns("4", "lock.json"))
    resumed = train(consistency_config(digits_data_dir, edm_teacher_workdir, target_ema_decay=0.5),
                    tmp_path / "resumed")
    for a, b in ((resumed.params, final.params), (resumed.ema_params, final.ema_params)):
        assert all(jax.tree.leaves(jax.tree.map(np.array_equal, a, b)))


def test_ict_resumes_mid_curriculum_exactly(digits_data_dir, tmp_path):
    # N doubles from s0 = 2 at step 2 of 4 (two stages of K' = 2 steps); killed after step 3.
    options = dict(curriculum="ict", s0=2, s1=4, level_sampling="lognormal", weighting="inverse_gap",
                   distance="pseudo_huber")
    final = train(consistency_config(digits_data_dir, **options), tmp_path / "straight")
    logged = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    levels = {row["step"]: row["num_levels"] for row in logged if "num_levels" in row}
    assert levels == {1: 3.0, 2: 3.0, 3: 5.0, 4: 5.0}
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed", ignore=shutil.ignore_patterns("4", "lock.json"))
    resumed = train(consistency_config(digits_data_dir, **options), tmp_path / "resumed")
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, resumed.params, final.params)))


def test_consistency_config_errors_name_the_field(edm_teacher_workdir, digits_data_dir, tmp_path):
    assert_build_errors([
        (consistency_config(digits_data_dir, tmp_path / "nowhere"),
         r"^consistency.teacher_workdir: .*nowhere has no checkpoints/"),
        (consistency_config(digits_data_dir, target_ema_decay=0.7), r"^consistency.target_ema_decay: 0.7"),
        (consistency_config(digits_data_dir, distance="lpips"), r"^consistency.distance: unknown 'lpips'"),
        (consistency_config(digits_data_dir, curriculum="ict", s0=8, s1=4), r"^consistency.s0, consistency.s1: 8, 4"),
        (changed(consistency_config(digits_data_dir), {"diffusion.preconditioning": "edm"}),
         r"^diffusion.preconditioning: 'edm'; training.objective='consistency' needs 'consistency'"),
        (changed(consistency_config(digits_data_dir, edm_teacher_workdir),
                 {"data.image_size": 16, "model.attn_resolutions": (8,)}),
         r"^data.image_size: .*teacher_workdir .* models \(8, 8, 1\) examples"),
    ])


def test_a_discrete_teacher_is_read_in_the_ve_scale():
    schedule = schedules.linear(1000)
    mixture = exact.ring(4, std=0.1)
    on_schedule = exact.x0_model(mixture, dj.sde.DiscreteVP.from_schedule(schedule))  # at fractional times
    ve = consistency.ve_denoiser(on_schedule, schedule, "x0")
    x = jnp.asarray(mixture.sample(np.random.default_rng(0), 64), jnp.float32)
    sigma = jnp.full((64,), 2.0)
    noisy = x + 2.0 * jax.random.normal(jax.random.key(0), x.shape)
    np.testing.assert_allclose(ve(noisy, sigma), exact.x0_model(mixture, dj.sde.EDM())(noisy, sigma), atol=2e-3)
