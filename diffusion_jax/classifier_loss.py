"""The training loss of a noise-aware classifier p_phi(y | x_t, t), for classifier guidance.

Dhariwal & Nichol 2021 (arXiv 2105.05233, §4 and guided-diffusion's `classifier_train.py`)
train the classifier on the same noised images the diffusion model sees: t ~ U{0..T-1},
x_t ~ q(x_t | x_0) (Ho et al. 2020, Eq. 4), and the softmax cross-entropy of its logits at
(x_t, t) against the labels. Kept out of `guidance.py`, whose functions act at sampling
time, so that the guidance math and this training objective change for separate reasons;
it is the classifier's counterpart of `diffusion.simple_loss`.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from diffusion_jax.diffusion import noise_at_random_times
from diffusion_jax.guidance import label_log_prob
from diffusion_jax.schedules import Schedule

LogitsFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x_t [B, ...], t [B]) -> logits [B, K]


def noisy_classifier_loss(
    logits_fn: LogitsFn, schedule: Schedule, x0: jax.Array, labels: jax.Array, key: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean cross-entropy -log p_phi(y | x_t, t) over the batch, with x_t = q_sample(x0, t, eps).

    x0: clean data [B, ...]; labels: int [B]; t ~ U{0..T-1}, eps ~ N(0, I) drawn from `key`.
    Returns (loss, {'accuracy': top-1 accuracy [], 't': [B], 'nll': [B]}).
    """
    t, _, x_t = noise_at_random_times(schedule, x0, key)  # t [B]
    logits = logits_fn(x_t, t)  # [B, K]
    nll = -label_log_prob(logits, labels)  # [B]
    accuracy = jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))
    return jnp.mean(nll), {"accuracy": accuracy, "t": t, "nll": nll}
