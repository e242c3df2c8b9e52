"""Predictor-corrector, annealed Langevin and probability-flow ODE samplers on exact denoisers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffusion_jax as dj
from diffusion_jax import exact, sde
from diffusion_jax.errors import ConfigError

GAUSSIAN = exact.GaussianMixture(np.array([[0.6, -0.4]]), 0.5, np.array([1.0]))
N = 20_000


def run(name, process, x_T=None, model=None, **options):
    x_T = process.prior_sample(jax.random.key(1), (N, 2)) if x_T is None else x_T
    model = model or exact.x0_model(GAUSSIAN, process)
    return dj.samplers.get(name)(model, process, jax.random.key(2), x_T, prediction="x0", return_info=True, **options)


def moments_error(x):
    x = np.asarray(x, np.float64)
    return np.abs(x.mean(0) - GAUSSIAN.means[0]).max(), np.abs(np.cov(x.T) - 0.25 * np.eye(2)).max()


@pytest.mark.parametrize(
    "process,options",
    [
        (sde.VESDE(), dict(predictor="reverse_diffusion")),  # Song et al. Algorithm 4
        (sde.VPSDE(), dict(predictor="reverse_diffusion")),  # Algorithm 5
        (sde.VPSDE(), dict(predictor="euler_maruyama")),
        # Unadjusted Langevin is biased in proportion to its step: on sub-VP, snr = 0.16 leaves the
        # covariance 0.034 off at any number of levels, snr = 0.05 0.005.
        (sde.SubVPSDE(), dict(predictor="euler_maruyama", snr=0.05)),
    ],
    ids=["ve-rd", "vp-rd", "vp-em", "subvp-em"],
)
def test_predictor_corrector_reproduces_gaussian_data(process, options):
    x, info = run("pc", process, steps=200, **options)
    mean_err, cov_err = moments_error(x)
    assert mean_err < 0.02 and cov_err < 0.02, (mean_err, cov_err)
    assert int(info.nfe) == 400  # one predictor and one corrector evaluation per level


def test_predictor_corrector_converges_with_steps_and_runs_on_discrete_schedules():
    sched = dj.schedules.linear(1000)
    x_T = jax.random.normal(jax.random.key(1), (N, 2))
    coarse = moments_error(run("pc", sched, x_T, steps=10)[0])[1]
    fine = moments_error(run("pc", sched, x_T, steps=200)[0])[1]
    assert fine < 0.02 < coarse, (fine, coarse)
    corrector_only, info = run("pc", sde.VESDE(), steps=5, predictor="none", n_corrector=3)
    assert int(info.nfe) == 15


def test_annealed_langevin_ncsn_settings():
    """Song & Ermon 2019 Algorithm 1 with their CIFAR-10 settings: 10 geometric sigmas from 1 to 0.01,
    100 steps each, step_lr 2e-5 (here on a VE process with that range)."""
    process = sde.VESDE(sigma_min=0.01, sigma_max=1.0)
    levels = dj.samplers.levels.noise_levels(process, 10, "logsnr")
    np.testing.assert_allclose(levels.sigma[::-1], np.geomspace(1.0, 0.01, 10), rtol=1e-4)
    x, info = run("langevin", process, steps=10)
    mean_err, cov_err = moments_error(x)
    assert mean_err < 0.02 and cov_err < 0.025, (mean_err, cov_err)
    assert int(info.nfe) == 10 * 100 + 1  # + Tweedie's final denoising step
    # Too few Langevin steps per level do not mix: x stays near x_T's scale.
    assert moments_error(run("langevin", process, steps=10, n_steps_each=2)[0])[1] > 0.1


@pytest.mark.parametrize(
    "process", [sde.VPSDE(), sde.SubVPSDE(), sde.VESDE(), sde.EDM()], ids=["vp", "subvp", "ve", "edm"]
)
def test_probability_flow_ode_reproduces_gaussian_data(process):
    x, info = run("ode", process, rtol=1e-5, atol=1e-5)
    mean_err, cov_err = moments_error(x)
    assert mean_err < 0.02 and cov_err < 0.01, (mean_err, cov_err)
    assert 20 < int(info.nfe) < 400


def test_ode_counts_its_network_evaluations_and_follows_tolerances():
    process = sde.VPSDE()
    calls = []
    model = exact.x0_model(GAUSSIAN, process)

    def counting(x_t, t):
        jax.debug.callback(lambda: calls.append(1))
        return model(x_t, t)

    x_T = process.prior_sample(jax.random.key(1), (64, 2))
    nfe = {}
    for tol in (1e-3, 1e-6):
        calls.clear()
        _, info = run("ode", process, x_T, counting, rtol=tol, atol=tol)
        jax.effects_barrier()
        nfe[tol] = int(info.nfe)
        assert nfe[tol] == len(calls)
    assert nfe[1e-6] > 2 * nfe[1e-3]


def test_ode_encode_decode_round_trip():
    """Song et al. 2021 §4.3: the probability-flow ODE is a bijection x_0 <-> x_T."""
    for process in (sde.VPSDE(), sde.as_process(dj.schedules.linear(1000))):
        model = exact.x0_model(GAUSSIAN, process)
        x0 = jnp.asarray(GAUSSIAN.sample(np.random.default_rng(0), 256))
        x_T = dj.samplers.ode_encode(model, process, x0, prediction="x0", rtol=1e-6, atol=1e-6)
        assert 0.85 < float(jnp.std(x_T)) < 1.15  # a prior sample, not the data
        back = dj.samplers.ode_sample(model, process, None, x_T, prediction="x0", rtol=1e-6, atol=1e-6,
                                      denoise_final=False)
        assert float(jnp.abs(back - x0).max()) < 5e-3


def test_ode_on_a_discrete_schedule_uses_its_continuous_view():
    sched = dj.schedules.linear(1000)
    process = sde.as_process(sched)
    np.testing.assert_allclose(process.log_alpha(np.arange(1000.0)), np.log(np.asarray(sched.alpha, np.float64)))
    x_T = jax.random.normal(jax.random.key(1), (N, 2))
    x, info = run("ode", sched, x_T, exact.x0_model(GAUSSIAN, process))
    mean_err, cov_err = moments_error(x)
    assert mean_err < 0.02 and cov_err < 0.01, (mean_err, cov_err)
    # The spline keeps the ODE smooth: about the NFE of the VP SDE it discretises (68 here),
    # where linear interpolation of log alpha, kinked at every timestep, took 536.
    _, vp_info = run("ode", sde.VPSDE(), x_T)
    assert int(info.nfe) < 1.5 * int(vp_info.nfe), (int(info.nfe), int(vp_info.nfe))


def test_bad_options():
    process = sde.VESDE()
    for options, field in [
        (dict(predictor="ancestral"), "sample.predictor"),
        (dict(corrector="ald"), "sample.corrector"),
        (dict(n_corrector=-1), "sample.n_corrector"),
    ]:
        with pytest.raises(ConfigError, match=field):
            run("pc", process, steps=3, **options)
    with pytest.raises(ConfigError, match="sample.ode_solver"):
        run("ode", process, ode_solver="rk45")
    with pytest.raises(ConfigError, match="sample.rtol"):
        run("ode", process, rtol=0.0)
    with pytest.raises(ConfigError, match="sample.n_steps_each"):
        run("langevin", process, steps=3, n_steps_each=0)
