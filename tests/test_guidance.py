"""Classifier-free guidance and autoguidance with exact Gaussian-mixture denoisers."""

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


def ring_statistics(x: np.ndarray, ring: exact.GaussianMixture) -> dict[str, float]:
    """Diversity and fidelity on a ring: the entropy of the nearest-mode shares (log 8 when balanced), the rms
    distance to the nearest mode centre (the truth's: its std), and the mean outward offset from that centre."""
    nearest = np.linalg.norm(x[:, None] - ring.means[None], axis=-1).argmin(1)
    shares = np.bincount(nearest, minlength=len(ring.means)) / len(x)
    offset = x - ring.means[nearest]
    return {"entropy": float(-(shares * np.log(shares)).sum()), "spread": float(np.sqrt((offset**2).mean())),
            "outward": float((offset * ring.means[nearest]).sum(1).mean())}


def test_autoguidance_corrects_a_too_wide_model_without_cfgs_outward_push(sched):
    """Karras et al. 2024's claim on the exact ring (data std 0.05): a model that is too wide (std 0.1), guided
    away from a weaker one (std 0.2) at w = 1, samples the truth's spread with every mode kept equally and no
    bias; CFG of the same model at w = 1 also moves samples, but outward, away from the other classes."""
    truth, model, weak = (exact.ring(8, 1.0, std) for std in (0.05, 0.1, 0.2))
    x_T = jax.random.normal(jax.random.key(0), (4000, 2))

    def draw(model_fn):
        return np.asarray(dj.samplers.get("dpm_solver++")(model_fn, sched, jax.random.key(1), x_T, steps=25,
                                                          prediction="x0"))

    alone = ring_statistics(draw(exact.x0_model(model, sched)), truth)
    auto = ring_statistics(draw(guidance.autoguidance(exact.x0_model(model, sched), exact.x0_model(weak, sched),
                                                      1.0)), truth)
    labels = jnp.arange(4000) % 8
    cfg = ring_statistics(draw(guidance.classifier_free(exact.conditional_x0_model(model, sched), labels, 8, 1.0)),
                          truth)
    assert abs(alone["spread"] - 0.1) < 0.01 and abs(auto["spread"] - 0.05) < 0.01, (alone, auto)
    assert abs(auto["entropy"] - np.log(8)) < 0.01 and abs(auto["outward"]) < 0.01, auto
    assert cfg["outward"] > 0.07, cfg


def test_autoguidance_weights_and_kept_channels():
    x, t = jnp.zeros((2, 4, 4, 6)), jnp.zeros((2,), jnp.int32)
    strong = lambda x_t, t: jnp.full_like(x_t, 2.0)  # noqa: E731
    weak = lambda x_t, t: jnp.full_like(x_t[..., :3], 1.0)  # noqa: E731  a guide without the learned variance
    out = guidance.autoguidance(strong, weak, 1.5, channels=3)(x, t)
    np.testing.assert_allclose(out[..., :3], 2.0 + 1.5 * (2.0 - 1.0))
    np.testing.assert_allclose(out[..., 3:], 2.0)  # the model's own variance
    np.testing.assert_allclose(guidance.autoguidance(strong, strong, 4.0)(x, t), 2.0)  # a guide equal to the model
