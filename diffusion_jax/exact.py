"""Closed-form denoisers of Gaussian-mixture data, for testing and benchmarking samplers.

For x_0 ~ sum_k pi_k N(mu_k, s^2 I) and x_t = alpha x_0 + sigma eps, each component gives
x_t | k ~ N(alpha mu_k, (alpha^2 s^2 + sigma^2) I), so the exact denoiser is

    E[x_0 | x_t] = sum_k w_k(x_t) (mu_k + alpha s^2 / (alpha^2 s^2 + sigma^2) (x_t - alpha mu_k)),

with responsibilities w_k proportional to pi_k N(x_t; alpha mu_k, (alpha^2 s^2 + sigma^2) I).
A sampler driven by it must reproduce the mixture; samplers differ only in how they
discretise the reverse process.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.schedules import Schedule


class GaussianMixture(NamedTuple):
    """sum_k weights[k] N(means[k], std^2 I): means [K, D], weights [K]."""

    means: np.ndarray
    std: float
    weights: np.ndarray

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """n exact samples, float32 [n, D]."""
        k = rng.choice(len(self.weights), size=n, p=self.weights)
        return (self.means[k] + self.std * rng.standard_normal((n, self.means.shape[1]))).astype(np.float32)


def ring(num_modes: int = 8, radius: float = 1.0, std: float = 0.05) -> GaussianMixture:
    """Equal-weight narrow Gaussians evenly spaced on a circle in 2-D."""
    angles = 2 * np.pi * np.arange(num_modes) / num_modes
    means = radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return GaussianMixture(means, std, np.full(num_modes, 1.0 / num_modes))


def component_log_posterior(
    mixture: GaussianMixture, x_t: jax.Array, alpha: jax.Array, sigma: jax.Array, weights: jax.Array | None = None
) -> jax.Array:
    """log p(k | x_t) [B, K] for x_t [B, D]; alpha, sigma broadcast against [B, 1].

    Bayes' rule with x_t | k ~ N(alpha mu_k, (alpha^2 s^2 + sigma^2) I): p(k | x_t) is
    proportional to pi_k N(x_t; alpha mu_k, (alpha^2 s^2 + sigma^2) I). `weights` [B, K]
    replaces the prior pi per example. alpha = 1, sigma = 0 gives the posterior at x_0.
    """
    means = jnp.asarray(mixture.means, jnp.float32)  # [K, D]
    var = alpha**2 * mixture.std**2 + sigma**2  # [B, 1]
    sq_dist = jnp.sum(jnp.square(x_t[:, None, :] - alpha[:, None] * means[None]), axis=-1)  # [B, K]
    weights = jnp.asarray(mixture.weights, jnp.float32) if weights is None else weights
    return jax.nn.log_softmax(jnp.log(weights) - 0.5 * sq_dist / var, axis=-1)  # equal variances: D log var cancels


def posterior_mean(
    mixture: GaussianMixture, x_t: jax.Array, alpha: jax.Array, sigma: jax.Array, weights: jax.Array | None = None
) -> jax.Array:
    """E[x_0 | x_t] for x_t [B, D]; alpha, sigma broadcast against [B, 1].

    `weights` [B, K] replaces the mixture weights per example (one-hot: one component).
    """
    means = jnp.asarray(mixture.means, jnp.float32)  # [K, D]
    var = alpha**2 * mixture.std**2 + sigma**2  # [B, 1]
    w = jnp.exp(component_log_posterior(mixture, x_t, alpha, sigma, weights))  # [B, K]
    per_component = means[None] + (alpha * mixture.std**2 / var)[:, None] * (x_t[:, None, :] - alpha[:, None] * means)
    return jnp.einsum("bk,bkd->bd", w, per_component)


def x0_model(mixture: GaussianMixture, schedule: Schedule):
    """model_fn(x_t, t) -> E[x_0 | x_t] (prediction='x0') for a discrete schedule or an `sde.Process`.

    x_t may have any shape [B, ...] whose trailing dimensions flatten to D.
    """

    def model_fn(x_t: jax.Array, t: jax.Array) -> jax.Array:
        flat = x_t.reshape(x_t.shape[0], -1)
        alpha, sigma = (c[:, None] for c in schedule.alpha_sigma(t))
        return posterior_mean(mixture, flat, alpha, sigma).reshape(x_t.shape)

    return model_fn


def velocity_model(mixture: GaussianMixture, process: Any):
    """model_fn(x_t, t) -> E[eps - x_0 | x_t] = (x_t - E[x_0 | x_t]) / t (prediction='velocity') on `sde.Flow`,
    where sigma_t = t; x_t [B, D]."""
    denoise = x0_model(mixture, process)
    return lambda x_t, t: (x_t - denoise(x_t, t)) / t[:, None]


def sliced_wasserstein(a: np.ndarray, b: np.ndarray, num_projections: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between two equal-size point sets [N, D]."""
    rng = np.random.default_rng(seed)
    directions = rng.standard_normal((a.shape[1], num_projections))
    directions /= np.linalg.norm(directions, axis=0, keepdims=True)
    pa, pb = np.sort(a @ directions, axis=0), np.sort(b @ directions, axis=0)
    return float(np.sqrt(np.mean(np.square(pa - pb))))


def conditional_x0_model(mixture: GaussianMixture, schedule: Schedule):
    """model_fn(x_t, t, cond) -> E[x_0 | x_t, class cond] where class k is component k and
    cond == K (the null label) means the whole mixture (prediction='x0')."""
    num_classes = len(mixture.weights)
    table = jnp.concatenate([jnp.eye(num_classes), jnp.asarray(mixture.weights, jnp.float32)[None]])  # [K+1, K]

    def model_fn(x_t: jax.Array, t: jax.Array, cond: jax.Array) -> jax.Array:
        flat = x_t.reshape(x_t.shape[0], -1)
        alpha, sigma = (c[:, None] for c in schedule.alpha_sigma(t))
        return posterior_mean(mixture, flat, alpha, sigma, weights=table[cond]).reshape(x_t.shape)

    return model_fn


def class_posterior(mixture: GaussianMixture, x: np.ndarray) -> np.ndarray:
    """p(class k | x_0 = x) under the mixture, float32 [N, K]."""
    one, zero = jnp.ones((x.shape[0], 1)), jnp.zeros((x.shape[0], 1))
    return np.asarray(jnp.exp(component_log_posterior(mixture, jnp.asarray(x, jnp.float32), one, zero)))


def class_log_prob(mixture: GaussianMixture, schedule: Schedule) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """The exact noise-aware classifier `fn(x_t, t) -> log p(k | x_t)` [B, K], class k = component k.

    p(k | x_t) is proportional to pi_k N(x_t; alpha_t mu_k, (alpha_t^2 s^2 + sigma_t^2) I), with
    (alpha_t, sigma_t) = `schedule.alpha_sigma(t)` (a discrete schedule indexed by the model time,
    or any process with that method). x_t may have any shape [B, ...] flattening to D. This is
    what `guidance.classifier_grad` differentiates for exact classifier guidance.
    """

    def log_prob_fn(x_t: jax.Array, t: jax.Array) -> jax.Array:
        alpha, sigma = schedule.alpha_sigma(t)  # [B] each
        flat = x_t.reshape(x_t.shape[0], -1)  # [B, D]
        return component_log_posterior(mixture, flat, alpha[:, None], sigma[:, None])  # [B, K]

    return log_prob_fn
