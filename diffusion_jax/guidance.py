"""Guidance as denoiser transforms: each turns a conditional network into a `model_fn(x_t, t)`
that any sampler drives unchanged (DESIGN §4 'Denoiser').

- Classifier-free guidance (Ho & Salimans 2022): `classifier_free`.
- Autoguidance (Karras et al. 2024, arXiv 2406.02507): `autoguidance`, guided by a weaker version of the
  model itself (smaller, or trained less) in place of the unconditional one.
- Classifier guidance (Dhariwal & Nichol 2021, arXiv 2105.05233, §4): `classifier_grad` builds
  s * grad_{x_t} log p(y | x_t, t) from a noise-aware classifier; `classifier_guided` applies it
  to the denoiser (their Algorithm 2, for DDIM and every other eps-based sampler), and the
  same gradient function is the `cond_fn` of ancestral DDPM sampling (their Algorithm 1).
"""

from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from diffusion_jax import conditioning, diffusion

# (x_t [B, ...], t [B], cond: labels [B] or a condition dict, `conditioning`) -> prediction [B, ...]
ConditionalModelFn = Callable[[jax.Array, jax.Array, Any], jax.Array]
# (x_t [B, ...], t [B]) -> logits (or log-probabilities) of a noise-aware classifier [B, K]
LogitsFn = Callable[[jax.Array, jax.Array], jax.Array]
# (x_t [B, ...], t [B]) -> s * grad_{x_t} log p(y | x_t, t) [B, ...]; DDPM's `cond_fn`
GradFn = Callable[[jax.Array, jax.Array], jax.Array]


class HasAlphaSigma(Protocol):
    """Anything that gives the noise level of a model time: `schedules.Schedule` (int t, the
    training-schedule index) and the continuous processes of `diffusion_jax.sde` (float t)."""

    def alpha_sigma(self, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(alpha_t, sigma_t) of x_t = alpha_t x_0 + sigma_t eps, each shaped like t."""
        ...


def classifier_free(
    model_fn: ConditionalModelFn,
    cond: conditioning.Cond,
    null_label: int | None,
    guidance_weight: float,
    interval: tuple[int, int] | None = None,
    channels: int | None = None,
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """Classifier-free guidance (Ho & Salimans 2022, arXiv 2207.12598, Eq. 6):

        eps~(x, c) = (1 + w) eps(x, c) - w eps(x, null).

    `cond` is any condition (`diffusion_jax.conditioning`: labels, text tokens, a context sequence,
    a pooled embedding); its null condition (`conditioning.null`: the null label `null_label`,
    empty sequences, zero pooled embeddings) gives eps(x, null).
    `guidance_weight` is Ho & Salimans' w: w = 0 is the plain conditional model. The
    other common convention, a "scale" s (diffusers' `guidance_scale`, DiT's `cfg_scale`),
    is eps(x, null) + s (eps(x, c) - eps(x, null)), i.e. s = 1 + w. The combination
    weights sum to one, so it is the same guidance whichever of eps, x0 or v the
    network predicts. Both passes run as one batched forward of size 2B.
    `interval=(t_lo, t_hi)` guides only at training timesteps t_lo <= t <= t_hi
    (Kynkäänniemi et al. 2024, arXiv 2404.07724) and uses the conditional model elsewhere.
    `channels=k` guides only the first k channels of the output (last axis) and returns the
    conditional model's values in the rest: with k = the prediction's channels, a learned
    variance stays conditional; k = 3 on 4-channel latents is DiT's `forward_with_cfg`, which
    its reported FIDs were measured with (Peebles & Xie 2023).
    """

    both = conditioning.concat(cond, conditioning.null(cond, null_label))  # [2B]: conditional, then null

    def guided(x_t: jax.Array, t: jax.Array) -> jax.Array:
        batch = x_t.shape[0]
        out = model_fn(jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t]), both)
        conditional, unconditional = out[:batch], out[batch:]
        w = jnp.asarray(guidance_weight, conditional.dtype)
        if interval is not None:
            inside = (t >= interval[0]) & (t <= interval[1])
            w = jnp.where(inside, w, 0.0).reshape((batch,) + (1,) * (x_t.ndim - 1))
        guided_out = conditional + w * (conditional - unconditional)
        if channels is None:
            return guided_out
        return jnp.concatenate([guided_out[..., :channels], conditional[..., channels:]], axis=-1)

    return guided


def autoguidance(
    model_fn: Callable[[jax.Array, jax.Array], jax.Array],
    guide_fn: Callable[[jax.Array, jax.Array], jax.Array],
    guidance_weight: float,
    channels: int | None = None,
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """Autoguidance (Karras et al. 2024, arXiv 2406.02507, Eq. 1):

        D_s(x; σ, c) = s D_1(x; σ, c) + (1 − s) D_0(x; σ, c),   s = 1 + w,

    with D_1 the model and D_0 (`guide_fn`) a weaker version of it: smaller, trained for fewer steps,
    or both, with the same conditioning closed over. Where CFG's unconditional model differs from the
    conditional one in what it models, the weak model differs in the errors it makes, so extrapolating
    away from it corrects those errors without CFG's loss of variation (Fig. 1). `guidance_weight` is w
    (w = 0: the model itself), as in `classifier_free`; the weights sum to one, so it holds for an eps, x0
    or v network alike (both must predict the same kind on the same process). `channels=k` guides the
    first k output channels and keeps the model's values in the rest (a learned variance)."""

    def guided(x_t: jax.Array, t: jax.Array) -> jax.Array:
        strong, weak = model_fn(x_t, t), guide_fn(x_t, t)
        if channels is not None:
            weak = jnp.concatenate([weak[..., :channels], strong[..., channels:]], axis=-1)
        return strong + jnp.asarray(guidance_weight, strong.dtype) * (strong - weak)

    return guided


def guided_model_fn(
    network: Callable[[jax.Array, jax.Array, Any], jax.Array],
    cond: Any,
    guidance_scale: float | None,
    null_label: int | None,
    channels: int | None = None,
    guide_fn: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """The `model_fn(x_t, t)` a sampler drives at guidance scale s = 1 + w (sample mode's and `LoadedModel.sample`'s
    rule): `network(x_t, t, cond)` guided by `guide_fn` (`autoguidance`) when one is given, else by its own
    unconditional output (`classifier_free`) when s is neither None nor 1, else unguided."""
    if guide_fn is not None and guidance_scale is not None:
        return autoguidance(lambda x_t, t: network(x_t, t, cond), guide_fn, guidance_scale - 1.0, channels=channels)
    if guidance_scale is None or guidance_scale == 1.0:
        return lambda x_t, t: network(x_t, t, cond)
    return classifier_free(network, cond, null_label, guidance_scale - 1.0, channels=channels)


def label_log_prob(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """log p(y_b | x_b) = log_softmax(logits)[b, y_b]: logits [B, K], labels int [B] -> [B] float32.

    Logits may be unnormalised or already log-probabilities (log_softmax is idempotent on them).
    """
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [B, K]
    return jnp.take_along_axis(log_probs, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]


def classifier_grad(logits_fn: LogitsFn, labels: jax.Array, scale: float) -> GradFn:
    """The classifier-guidance gradient g(x_t, t) = s * grad_{x_t} log p_phi(y | x_t, t), [B, ...].

    Dhariwal & Nichol 2021 (arXiv 2105.05233), Algorithms 1 and 2; guided-diffusion's
    `cond_fn`. `logits_fn(x_t, t)` is a noise-aware classifier p_phi(y | x_t, t) (logits or
    log-probabilities [B, K]) called with the same model time t as the diffusion model;
    `labels` int [B] are the target classes y.

    Scale convention: `scale` is their gradient scale s (guided-diffusion's `classifier_scale`).
    s * grad log p(y | x) = grad log p(y | x)^s, i.e. sampling from p(x | y) proportional to
    p(x) p(y | x)^s up to normalisation: s = 1 is the exact class-conditional distribution
    (with an exact classifier and denoiser), s > 1 sharpens it towards the classifier's modes,
    s = 0 is the unconditional model.

    The gradient is `jax.grad` of sum_b log p(y_b | x_b, t_b): since examples are independent
    (the classifier mixes nothing across the batch; no batch norm), its slice b is the
    per-example gradient of log p(y_b | x_b, t_b).
    """

    def grad_fn(x_t: jax.Array, t: jax.Array) -> jax.Array:
        def total_log_prob(x: jax.Array) -> jax.Array:
            return jnp.sum(label_log_prob(logits_fn(x, t), labels))

        return (scale * jax.grad(total_log_prob)(x_t)).astype(x_t.dtype)  # [B, ...]

    return grad_fn


def classifier_guided(
    model_fn: diffusion.ModelFn, grad_fn: GradFn, process: HasAlphaSigma, prediction: str
) -> diffusion.ModelFn:
    """Classifier guidance for DDIM-type samplers (Dhariwal & Nichol 2021, §4.2, Algorithm 2).

    Returns a `model_fn(x_t, t)` of the same `prediction` kind ('eps' | 'x0' | 'v' | 'score') whose
    noise estimate is

        eps~(x_t) = eps_theta(x_t) - sigma_t * grad_fn(x_t, t)     (sigma_t = sqrt(1 - alpha-bar_t) for DDPM),

    i.e. the score -eps~/sigma_t = grad log p(x_t) + s grad log p(y | x_t) of p(x_t) p(y | x_t)^s
    (their score-based conditioning trick, after Song et al. 2021). The network output is
    converted to (x_0, eps) and back with `diffusion.to_x0_eps` / `training_target`, with
    x_0 = (x_t - sigma_t eps~) / alpha_t, as guided-diffusion's `condition_score` does; a score
    model's output becomes score + s grad log p(y | x_t) (Song et al. 2021, arXiv 2011.13456, §5).
    Being a denoiser transform, it drives any sampler: DDIM, DPM-Solver++, EDM, and DDPM too
    (Algorithm 2 under an ancestral sampler; Algorithm 1 is DDPM's `cond_fn` instead).

    Args:
        model_fn: the (unconditional or conditional) denoiser, `model_fn(x_t, t)`.
        grad_fn: s * grad_{x_t} log p(y | x_t, t) from `classifier_grad` (s inside).
        process: gives (alpha_t, sigma_t) of the model time t through `alpha_sigma(t)`: the
            *training* schedule for a discrete model (t is the training index the samplers
            pass to `model_fn`), or a continuous process of `diffusion_jax.sde`.
        prediction: what `model_fn` predicts.

    For ancestral DDPM use Algorithm 1 instead: pass `grad_fn` itself as the sampler's
    `cond_fn` (`samplers.get('ddpm')(..., cond_fn=grad_fn)`), which shifts each step's mean
    to mu + Sigma * grad_fn(x_t, t), Sigma being that step's variance (§4.1, guided-diffusion's
    `condition_mean`).
    """
    diffusion.check_prediction(prediction, diffusion.MODEL_OUTPUTS)

    def guided(x_t: jax.Array, t: jax.Array) -> jax.Array:
        alpha, sigma = (diffusion.per_example(c, x_t) for c in process.alpha_sigma(t))  # [B, 1, ...] each
        eps = diffusion.to_x0_eps(model_fn(x_t, t), x_t, alpha, sigma, prediction).eps
        eps = eps - sigma * grad_fn(x_t, t)  # eps~ of Algorithm 2, [B, ...]
        if prediction == "score":
            return diffusion.score_from_eps(eps, sigma).astype(x_t.dtype)
        x0 = diffusion.x0_from_eps(x_t, eps, alpha, sigma)
        return diffusion.training_target(x0, eps, alpha, sigma, prediction).astype(x_t.dtype)

    return guided
