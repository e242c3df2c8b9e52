"""The forward process, posterior, parameterisations and loss against closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffusion_jax as dj
from diffusion_jax import diffusion


@pytest.fixture(scope="module")
def sched():
    return dj.schedules.linear(1000)


def test_q_marginal_equals_composed_single_steps(sched):
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    # Compose q(x_s | x_{s-1}) = N(sqrt(1-b_s) x_{s-1}, b_s) from x_0: mean coef m, variance v.
    m, v = 1.0, 0.0
    ms, vs = [], []
    for b in betas:
        m, v = np.sqrt(1 - b) * m, (1 - b) * v + b
        ms.append(m)
        vs.append(v)
    t = jnp.array([0, 1, 9, 499, 999])
    x0 = jnp.full((5, 1), 1.0)
    mean, var = diffusion.q_mean_variance(sched, x0, t)
    np.testing.assert_allclose(mean[:, 0], np.array(ms)[t], rtol=1e-5)
    np.testing.assert_allclose(var[:, 0], np.array(vs)[t], rtol=1e-5)
    # q_sample is that Gaussian: mean + std * noise.
    noise = jnp.full((5, 1), 0.5)
    np.testing.assert_allclose(
        diffusion.q_sample(sched, x0, t, noise)[:, 0], np.array(ms)[t] + np.sqrt(np.array(vs)[t]) * 0.5, rtol=1e-5
    )


def test_posterior_is_bayes_rule(sched):
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    ac = np.cumprod(1 - betas)
    t = np.array([1, 5, 100, 999])
    x0, x_t = np.array([0.3, -0.7, 1.0, 0.2]), np.array([1.1, 0.4, -0.5, 2.0])
    # prior x_{t-1} | x_0 ~ N(sqrt(ac_prev) x0, 1 - ac_prev); likelihood x_t | x_{t-1} ~ N(sqrt(1-b) x_{t-1}, b)
    prior_mean, prior_var = np.sqrt(ac[t - 1]) * x0, 1 - ac[t - 1]
    lik_coef, lik_var = np.sqrt(1 - betas[t]), betas[t]
    post_var = 1 / (1 / prior_var + lik_coef**2 / lik_var)
    post_mean = post_var * (prior_mean / prior_var + lik_coef * x_t / lik_var)
    mean, var, log_var = diffusion.q_posterior(sched, jnp.array(x0)[:, None], jnp.array(x_t)[:, None], jnp.array(t))
    np.testing.assert_allclose(mean[:, 0], post_mean, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(var[:, 0], post_var, rtol=2e-4)
    np.testing.assert_allclose(log_var[:, 0], np.log(post_var), rtol=2e-5, atol=1e-5)
    # At the first step the posterior collapses onto x_0.
    mean0, var0, _ = diffusion.q_posterior(sched, jnp.ones((1, 1)), jnp.zeros((1, 1)), jnp.array([0]))
    np.testing.assert_allclose(mean0, 1.0, rtol=1e-6)
    assert float(var0[0, 0]) == 0.0


def test_parameterisations_round_trip():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    x0 = jax.random.normal(k1, (4, 3, 3, 2))
    eps = jax.random.normal(k2, x0.shape)
    ac = jax.random.uniform(k3, (4, 1, 1, 1), minval=0.01, maxval=0.99)
    alpha, sigma = jnp.sqrt(ac), jnp.sqrt(1 - ac)
    x_t = alpha * x0 + sigma * eps
    v = diffusion.v_from_x0_eps(x0, eps, alpha, sigma)
    for kind, out in (("eps", eps), ("x0", x0), ("v", v)):
        pred = diffusion.to_x0_eps(out, x_t, alpha, sigma, kind)
        np.testing.assert_allclose(pred.x0, x0, atol=2e-4)
        np.testing.assert_allclose(pred.eps, eps, atol=2e-4)
        np.testing.assert_allclose(diffusion.training_target(x0, eps, alpha, sigma, kind), out, atol=1e-6)
    score = diffusion.score_from_eps(eps, sigma)
    np.testing.assert_allclose(diffusion.eps_from_score(score, sigma), eps, atol=1e-5)


def test_loss_weights():
    log_snr = jnp.log(jnp.array([0.1, 1.0, 10.0, 100.0]))
    snr = jnp.exp(log_snr)
    np.testing.assert_allclose(diffusion.loss_weight(log_snr, "eps", "none"), 1.0)
    weight = diffusion.loss_weight
    np.testing.assert_allclose(weight(log_snr, "eps", "min_snr", 5.0), jnp.minimum(snr, 5) / snr, rtol=1e-6)
    np.testing.assert_allclose(weight(log_snr, "x0", "snr"), snr, rtol=1e-6)
    np.testing.assert_allclose(weight(log_snr, "v", "truncated_snr"), jnp.maximum(snr, 1) / (snr + 1), rtol=1e-6)
    with pytest.raises(ValueError, match="diffusion.loss_weighting"):
        diffusion.loss_weight(log_snr, "eps", "p2")
    with pytest.raises(ValueError, match="diffusion.prediction: unknown prediction 'score'"):
        diffusion.loss_weight(log_snr, "score", "none")


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_simple_loss_is_zero_for_the_exact_denoiser(sched, prediction):
    # Data = one point c, so E[x0 | x_t] = c and every target is known in closed form.
    c = jnp.array([[0.5, -0.25]])
    x0 = jnp.tile(c, (64, 1))

    def oracle(x_t, t):
        alpha, sigma = diffusion.extract(sched.alpha, t, x_t), diffusion.extract(sched.sigma, t, x_t)
        eps = diffusion.eps_from_x0(x_t, c, alpha, sigma)
        return diffusion.training_target(c, eps, alpha, sigma, prediction)

    loss, aux = diffusion.simple_loss(oracle, sched, x0, jax.random.key(0), prediction=prediction, weighting="min_snr")
    assert aux["mse"].shape == (64,)
    assert float(loss) < 1e-6
    zeros = lambda x, t: jnp.zeros_like(x)  # noqa: E731
    wrong, _ = diffusion.simple_loss(zeros, sched, x0, jax.random.key(0), prediction=prediction)
    assert float(wrong) > 1e-2
