"""Classifier-free guidance with the exact conditional and unconditional denoisers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffusion_jax as dj
from diffusion_jax import exact, guidance

N = 8_000
# Two overlapping classes, so p(class | x) is not saturated and guidance has room to act.
MIXTURE = exact.GaussianMixture(np.array([[-0.4, 0.0], [0.4, 0.0]]), 0.4, np.array([0.5, 0.5]))


@pytest.fixture(scope="module")
def sched():
    return dj.schedules.linear(1000)


def sample(sched, weight, interval=None, cond_model=None, steps=100):
    cond_model = cond_model or exact.conditional_x0_model(MIXTURE, sched)
    labels = jnp.zeros((N,), jnp.int32)  # target class 0
    model = guidance.classifier_free(cond_model, labels, null_label=2, guidance_weight=weight, interval=interval)
    x_T = jax.random.normal(jax.random.key(1), (N, 2))
    return np.asarray(dj.samplers.get("ddpm")(model, sched, jax.random.key(2), x_T, steps=steps, prediction="x0"))


def test_weight_zero_is_the_conditional_distribution(sched):
    x = sample(sched, 0.0, steps=None)  # the full chain: respaced DDPM under-disperses
    np.testing.assert_allclose(x.mean(0), MIXTURE.means[0], atol=0.03)
    np.testing.assert_allclose(np.cov(x.T), 0.16 * np.eye(2), atol=0.02)


def test_larger_weight_raises_the_target_class_posterior(sched):
    p = [exact.class_posterior(MIXTURE, sample(sched, w))[:, 0].mean() for w in (0.0, 1.0, 3.0)]
    assert p[0] < p[1] < p[2], p
    assert p[2] > p[0] + 0.05


def test_one_batched_forward_per_step(sched):
    calls = []
    cond_model = exact.conditional_x0_model(MIXTURE, sched)

    def counting(x_t, t, cond):
        calls.append(x_t.shape[0])  # runs at trace time: once per traced step body
        return cond_model(x_t, t, cond)

    sample(sched, 1.0, cond_model=counting)
    assert calls == [2 * N]


def test_interval_outside_every_step_is_the_conditional_model(sched):
    np.testing.assert_allclose(sample(sched, 3.0, interval=(2000, 3000)), sample(sched, 0.0), atol=1e-5)
