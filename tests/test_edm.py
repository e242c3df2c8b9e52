"""EDM Euler and Heun driven by the exact denoiser of a smooth 4-mode ring."""

import jax
import numpy as np
import pytest

import diffusion_jax as dj
from diffusion_jax import exact
from diffusion_jax.errors import ConfigError

N = 20_000
MIXTURE = exact.ring(4, radius=1.0, std=0.3)


@pytest.fixture(scope="module")
def setup():
    sched = dj.schedules.linear(1000)
    reference = MIXTURE.sample(np.random.default_rng(0), N)
    floor = exact.sliced_wasserstein(MIXTURE.sample(np.random.default_rng(5), N), reference)  # ~0.019
    return sched, reference, floor, jax.random.normal(jax.random.key(1), (N, 2))


def distance(setup, name, key=2, **options):
    sched, reference, _, x_T = setup
    model = exact.x0_model(MIXTURE, sched)
    x = dj.samplers.get(name)(model, sched, jax.random.key(key), x_T, prediction="x0", **options)
    return exact.sliced_wasserstein(np.asarray(x), reference), np.asarray(x)


def test_euler_and_heun_converge(setup):
    floor = setup[2]
    assert distance(setup, "euler", steps=10)[0] > 4 * floor  # too few steps fail
    assert distance(setup, "euler", steps=70)[0] < 1.5 * floor
    assert distance(setup, "heun", steps=35)[0] < floor


def test_heun_beats_euler_at_equal_nfe(setup):
    heun_35_nfe = distance(setup, "heun", steps=18)[0]  # 2 * 18 - 1 network evaluations
    euler_35_nfe = distance(setup, "euler", steps=35)[0]
    assert heun_35_nfe < 0.85 * euler_35_nfe


def test_deterministic_without_churn_and_converging_with_it(setup):
    a, b = distance(setup, "heun", key=3, steps=10)[1], distance(setup, "heun", key=4, steps=10)[1]
    np.testing.assert_array_equal(a, b)
    churn = dict(s_tmin=0.05, s_tmax=50.0)
    coarse, _ = distance(setup, "heun", steps=18, s_churn=0.3 * 18, **churn)
    fine, _ = distance(setup, "heun", steps=150, s_churn=0.3 * 150, **churn)
    assert fine < 1.25 * setup[2] < 2.5 * setup[2] < coarse


def test_karras_spacing_and_errors(setup):
    sched = setup[0]
    ts = dj.schedules.sampling_timesteps(sched, 18, "karras")
    s = np.asarray(sched.sigma / sched.alpha)[ts]
    assert ts[0] == 0 and ts[-1] == 999
    target = (s[-1] ** (1 / 7) + np.linspace(0, 1, 18) * (s[0] ** (1 / 7) - s[-1] ** (1 / 7))) ** 7
    np.testing.assert_allclose(s[::-1], target, rtol=0.05)
    with pytest.raises(ConfigError, match="sample.solver"):
        distance(setup, "heun", steps=5, solver="rk4")
