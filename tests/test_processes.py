"""Continuous-time processes (sde.py): marginals against their SDEs, and the samplers on them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffusion_jax as dj
from diffusion_jax import exact, sde
from diffusion_jax.errors import ConfigError

PROCESSES = [sde.VPSDE(), sde.SubVPSDE(), sde.VESDE(), sde.EDM()]
IDS = ["vp", "subvp", "ve", "edm"]


@pytest.mark.parametrize("process", PROCESSES, ids=IDS)
def test_marginals_solve_the_sde(process):
    """For dx = f(t) x dt + g(t) dw the marginal moments obey d log alpha / dt = f and
    d sigma^2 / dt = 2 f sigma^2 + g^2 (Särkkä & Solin 2019, Eq. 5.51); checked with autodiff."""
    ts = jnp.linspace(process.t_min + 0.01 * (process.t_max - process.t_min), process.t_max, 9)

    def log_alpha(t):
        return jnp.log(process.alpha_sigma(t)[0])

    def var(t):
        return process.alpha_sigma(t)[1] ** 2

    x = jnp.ones((9, 1))
    drift, g = process.sde(x, ts)
    f = drift[:, 0]
    np.testing.assert_allclose(jax.vmap(jax.grad(log_alpha))(ts), f, rtol=1e-4, atol=1e-6)
    sigma2 = jax.vmap(var)(ts)
    np.testing.assert_allclose(jax.vmap(jax.grad(var))(ts), 2 * f * sigma2 + g**2, rtol=2e-3)


@pytest.mark.parametrize("process", PROCESSES, ids=IDS)
def test_time_at_log_snr_inverts_log_snr(process):
    t = np.linspace(process.t_min, process.t_max, 17)
    np.testing.assert_allclose(process.time_at_log_snr(process.log_snr(t)), t, rtol=1e-7)
    for spacing in ("linspace", "quadratic", "logsnr", "karras"):
        times = process.sampling_times(12, spacing)
        assert times[0] == process.t_min and times[-1] == process.t_max and np.all(np.diff(times) > 0)
    lam = process.log_snr(process.sampling_times(12, "logsnr"))
    np.testing.assert_allclose(np.diff(lam), np.diff(lam)[0], rtol=1e-6)
    with pytest.raises(ConfigError, match="sample.spacing"):
        process.sampling_times(12, "cubic")


def test_vp_sde_is_the_limit_of_ddpm_linear():
    """Ho et al.'s linear betas, 1e-4..0.02 over T = 1000, are the VP SDE with beta in [0.1, 20]
    (Song et al. 2021, App. B), up to the O(beta^2) terms of log(1 - beta) (< 0.04 in log alpha)."""
    discrete = np.log(np.asarray(dj.schedules.linear(1000).alpha, np.float64))
    continuous = np.log(sde.VPSDE().alpha_sigma((np.arange(1000) + 1) / 1000)[0])
    np.testing.assert_allclose(discrete, continuous, atol=0.04)
    assert np.abs(discrete - np.log(sde.VPSDE(beta_max=19.0).alpha_sigma((np.arange(1000) + 1) / 1000)[0])).max() > 0.2


@pytest.mark.parametrize("kind", ["edm", "ve", "vp"])
def test_preconditioning_matches_table_1(kind):
    sigma = jnp.asarray([0.002, 0.1, 1.0, 10.0, 80.0])
    c = sde.preconditioning(kind, sigma, sigma_data=0.5)
    if kind == "edm":
        # Unit-variance network input and training target for data of std sigma_data (EDM §5, App. B.6).
        np.testing.assert_allclose(c.c_in**2 * (0.25 + sigma**2), 1.0, rtol=1e-5)
        target_var = ((1 - c.c_skip) ** 2 * 0.25 + c.c_skip**2 * sigma**2) / c.c_out**2
        np.testing.assert_allclose(target_var, 1.0, rtol=1e-5)
    elif kind == "vp":  # c_noise = 999 t with sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)
        t = c.c_noise / 999
        np.testing.assert_allclose(jnp.sqrt(jnp.expm1(0.5 * 19.9 * t**2 + 0.1 * t)), sigma, rtol=1e-4)
    # An ideal backbone F = (x0 - c_skip x) / c_out makes the wrapper return x0 exactly.
    x0, n = jnp.ones((5, 3)), jnp.full((5, 3), 0.3)
    x = x0 + sigma[:, None] * n

    def ideal(x_in, c_noise):
        x_raw = x_in / c.c_in[:, None]
        np.testing.assert_allclose(c_noise, c.c_noise)
        return (x0 - c.c_skip[:, None] * x_raw) / c.c_out[:, None]

    np.testing.assert_allclose(sde.precondition(ideal, kind)(x, sigma), x0, rtol=1e-4)
    with pytest.raises(ConfigError, match="model.preconditioning"):
        sde.precondition(ideal, "karras")


GAUSSIAN = exact.GaussianMixture(np.array([[0.6, -0.4]]), 0.5, np.array([1.0]))
N = 20_000


@pytest.mark.parametrize("process", [sde.VPSDE(), sde.VESDE(), sde.EDM()], ids=["vp", "ve", "edm"])
@pytest.mark.parametrize("name,steps", [("ddim", 200), ("dpm_solver++", 30), ("heun", 40), ("ddpm", 500)])
def test_samplers_run_on_continuous_processes(process, name, steps):
    """One sampler implementation serves discrete and continuous processes (DESIGN §4)."""
    x_T = process.prior_sample(jax.random.key(1), (N, 2))
    model = exact.x0_model(GAUSSIAN, process)
    options = dict(spacing="logsnr") if name in ("ddim", "ddpm") else {}  # not uniform in sigma: EDM's t is sigma
    x, info = dj.samplers.get(name)(
        model, process, jax.random.key(2), x_T, steps=steps, prediction="x0", return_info=True, **options
    )
    x = np.asarray(x, np.float64)
    np.testing.assert_allclose(x.mean(0), GAUSSIAN.means[0], atol=0.03)
    np.testing.assert_allclose(np.cov(x.T), 0.25 * np.eye(2), atol=0.03)
    assert int(info.nfe) == (2 * steps - 1 if name == "heun" else steps)


def test_heun_at_35_nfe_beats_euler_at_70():
    """Karras et al. §3: Heun's second-order steps need half the NFE. On a 64-D mixture with
    the EDM process, 18 Heun steps (35 NFE) end closer to the exact ODE solution from the same
    x_T than 70 Euler steps, and Heun's error falls ~4x per halving of the step (second order).
    (Distances to data samples cannot separate the two at this sample size in 64-D; on a 2-D
    4-mode ring Heun-18 is 0.041 from the ODE solution against Euler-70's 0.030.)"""
    rng = np.random.default_rng(0)
    mixture = exact.GaussianMixture(0.5 * rng.standard_normal((8, 64)), 0.3, np.full(8, 1 / 8))
    process = sde.EDM()
    model = exact.x0_model(mixture, process)
    x_T = process.prior_sample(jax.random.key(1), (2000, 64))

    def run(name, steps):
        return np.asarray(dj.samplers.get(name)(model, process, jax.random.key(2), x_T, steps=steps, prediction="x0"))

    ode_solution = run("heun", 400)
    error = {(n, s): np.sqrt(np.mean(np.sum((run(n, s) - ode_solution) ** 2, 1))) for n, s in
             [("heun", 18), ("heun", 35), ("euler", 70)]}
    assert error["heun", 18] < error["euler", 70]
    assert error["heun", 35] < 0.4 * error["heun", 18]


def test_edm_churn_on_a_continuous_process():
    """With churn the raised sigma is exact (no rounding) and the sampler still converges."""
    process = sde.EDM()
    x_T = process.prior_sample(jax.random.key(1), (N, 2))
    model = exact.x0_model(GAUSSIAN, process)
    x = np.asarray(dj.samplers.get("heun")(model, process, jax.random.key(2), x_T, steps=60, prediction="x0",
                                           s_churn=30.0, s_tmin=0.05, s_tmax=50.0))
    np.testing.assert_allclose(x.mean(0), GAUSSIAN.means[0], atol=0.03)
    np.testing.assert_allclose(np.cov(x.T), 0.25 * np.eye(2), atol=0.03)


def test_continuous_process_needs_steps_and_prior():
    with pytest.raises(ConfigError, match="sample.steps"):
        dj.samplers.get("ddpm")(lambda x, t: x, sde.VPSDE(), jax.random.key(0), jnp.zeros((2, 2)))
    x = sde.VESDE().prior_sample(jax.random.key(0), (20_000, 2))
    assert abs(float(x.std()) - 50.0) < 1.0
    np.testing.assert_allclose(sde.VESDE().prior_logp(jnp.zeros((1, 2))), -np.log(2 * np.pi * 2500), rtol=1e-6)
