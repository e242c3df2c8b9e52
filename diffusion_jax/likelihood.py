"""Exact log-likelihoods from the probability-flow ODE (Song et al. 2021, arXiv 2011.13456, §4.3
and App. D.2), and bits/dim of 8-bit images under uniform dequantisation.

**What is estimated.** The probability-flow ODE dx/dt = f̃(x, t) = f(x, t) - g(t)^2 s(x, t) / 2
(Eq. 13, with the model's score s = -eps^ / sigma_t) is a continuous normalising flow, so the
instantaneous change of variables (Chen et al. 2018, arXiv 1806.07366, Thm. 1) gives
d log p_t(x(t)) / dt = -div f̃(x(t), t) along a trajectory, and (App. D.2)

    log p_{t_min}(x) = log p_T(z) + int_{t_min}^{t_max} div f̃(x(t), t) dt,    z = x(t_max),

where p_T is the prior N(0, prior_std^2 I). `ode_log_likelihood` integrates the augmented state
(x, int div f̃) from t_min to t_max with an adaptive Runge-Kutta solver (`samplers.ode.solve`,
one compiled program). p_{t_min} is the density of the model's flow: it equals the diffusion's
marginal only when the score is exact, but it is a normalised density either way.

**The divergence.** div f̃ = tr(df̃/dx) is estimated with the Skilling-Hutchinson estimator
E[eps^T (df̃/dx) eps] for probes with E[eps eps^T] = I (Gaussian or Rademacher), as FFJORD
(Grathwohl et al. 2019, arXiv 1810.01367, §3.1) and score_sde do: one probe set is drawn per
solve and held fixed along the trajectory, so the time integral is of eps^T (df̃/dx) eps for one
eps and the estimate of log p is unbiased (the trajectory of x does not depend on eps; only the
shared adaptive step sizes do, at the level of the solver tolerance). `num_probes` > 1 averages
several probes inside the drift. Each probe costs one Jacobian-vector product (`jax.linearize`:
one network forward, then a JVP per probe). With M the symmetrised time integral of df̃/dx along
the trajectory, one probe's estimate eps^T M eps has variance 2 ||M||_F^2 for Gaussian and
2 sum_{i != j} M_ij^2 for Rademacher probes, so Rademacher is never worse. `probe='exact'` takes
the trace from D JVPs along the basis vectors: the exact divergence, for low-dimensional data
(2-D toys; its probe array is [D, B, D]).

The estimate of log p is unbiased, but exp of it is not an unbiased estimate of p, and bits/dim
averaged over a dataset estimates the mean of -log p, not -log of a mean.

**t_min.** The integral starts at t_min > 0 of the process (score_sde's eps), where sigma > 0
keeps the score finite: the result is the density of x read as x_{t_min} = alpha x_0 + sigma eps,
a slightly smoothed version of the data density. For `VPSDE` (t_min = 1e-3, sigma ~ 0.01) this
smoothing is coarser than an 8-bit bin of [-1, 1] (2/256 = 0.0078), so image likelihoods should
pass `t_min=1e-5` as score_sde does (sigma ~ 0.001). For a discrete schedule (`sde.DiscreteVP`)
t_min is the first training step (alpha^2 = 1 - beta_1: sigma = 0.01 for the linear schedule, as
coarse as VP's default), the smallest time the network was trained at; going below it asks the
network about times it never saw.

**Bits/dim.** `dequantize` adds uniform noise to 8-bit pixels, k -> x = 2 (k + u) / 256 - 1
(Theis et al. 2016, arXiv 1511.01844; score_sde's `uniform_dequantization`), and
`bits_per_dim` converts the continuous density of x in [-1, 1] to bits/dim of the integer data,
as Song et al. 2021 report CIFAR-10 likelihoods. By Jensen's inequality the expectation over u
is an upper bound on the discrete negative log-likelihood; `ode_bits_per_dim` averages it over
`num_repeats` dequantisations and probe sets (score_sde's dataset repeats).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import diffusion, sde
from diffusion_jax.errors import ConfigError
from diffusion_jax.samplers.ode import probability_flow, solve

PROBES = ("gaussian", "rademacher", "exact")

Drift = Callable[[jax.Array, jax.Array], jax.Array]  # (x [B, ...], t scalar) -> dx/dt [B, ...]
AugmentedDrift = Callable[[tuple[jax.Array, jax.Array], jax.Array], tuple[jax.Array, jax.Array]]


class Likelihood(NamedTuple):
    """What `ode_log_likelihood` returns; log_p = prior_log_p + delta_log_p."""

    log_p: jax.Array  # float32 [B]: log p_{t_min}(x) in nats, the density in x's own space
    prior_log_p: jax.Array  # float32 [B]: log p_T(z) under the prior N(0, prior_std^2 I)
    delta_log_p: jax.Array  # float32 [B]: int_{t_min}^{t_max} div f̃ dt
    z: jax.Array  # float32 [B, ...]: the latent x(t_max)
    nfe: jax.Array  # int32 []: evaluations of the augmented drift (1 network call + one JVP per probe each)


def _check_probe(probe: str, num_probes: int) -> None:
    if probe not in PROBES:
        raise ConfigError(f"eval.ode_probe: unknown probe {probe!r}; choose one of: {', '.join(PROBES)}")
    if not isinstance(num_probes, int) or num_probes < 1:
        raise ConfigError(f"eval.ode_num_probes: got {num_probes!r}; expected an int >= 1")


def _start_time(process: sde.Process, t_min: float | None) -> float:
    """The time the integral starts at: `t_min`, or the process's own, checked to give sigma > 0."""
    t0 = process.t_min if t_min is None else float(t_min)
    with np.errstate(invalid="ignore"):
        sigma = process.alpha_sigma(np.float64(t0))[1]
    if not (t0 < process.t_max and np.isfinite(sigma) and sigma > 0):
        raise ConfigError(
            f"ode_log_likelihood t_min: got {t0!r}; expected a time below t_max = {process.t_max} where sigma(t) > 0"
        )
    return t0


def _probes(key: jax.Array, probe: str, num_probes: int, x: jax.Array) -> tuple[jax.Array, float]:
    """(probe vectors [P, B, ...], the weight of each probe's eps^T J eps in the divergence)."""
    if probe == "exact":  # tr J = sum_i e_i^T J e_i over the D basis vectors, the same for every example
        d = math.prod(x.shape[1:])
        basis = jnp.eye(d, dtype=x.dtype).reshape(d, 1, *x.shape[1:])  # [D, 1, ...]
        return jnp.broadcast_to(basis, (d, *x.shape)), 1.0
    shape = (num_probes, *x.shape)
    if probe == "gaussian":
        return jax.random.normal(key, shape, x.dtype), 1.0 / num_probes
    return jax.random.rademacher(key, shape, x.dtype), 1.0 / num_probes


def _augmented_drift(drift: Drift, probes: jax.Array, weight: float) -> AugmentedDrift:
    """d/dt (x, int div f̃) = (f̃(x, t), div f̃(x, t)) with the divergence from the probes [P, B, ...]."""

    def augmented(state: tuple[jax.Array, jax.Array], t: jax.Array) -> tuple[jax.Array, jax.Array]:
        x, _ = state  # x [B, ...]
        dx, jvp = jax.linearize(lambda y: drift(y, t), x)  # one network forward
        jv = jax.vmap(jvp)(probes)  # J eps per probe, [P, B, ...]; examples are independent, so J is block-diagonal
        div = weight * jnp.sum(probes * jv, axis=(0, *range(2, probes.ndim)))  # [B]
        return dx, div

    return augmented


def ode_log_likelihood(
    model_fn: diffusion.ModelFn,
    schedule: Any,
    key: jax.Array,
    x: jax.Array,
    prediction: str = "eps",
    *,
    probe: str = "rademacher",
    num_probes: int = 1,
    ode_solver: str = "tsit5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_steps: int = 4096,
    t_min: float | None = None,
) -> Likelihood:
    """log p(x) of data x [B, ...] under the probability-flow ODE (Song et al. 2021, App. D.2).

    Integrates d/dt (x, int div f̃) = (f̃(x, t), div f̃(x, t)) from t_min to t_max and returns
    log p = log p_T(z) + int div f̃ dt in nats, for the density of x in its own space (e.g. images
    in [-1, 1]; `bits_per_dim` converts). `schedule` is an `sde.Process` or a discrete schedule
    (solved in its `sde.DiscreteVP` view); `model_fn(x_t, t)` gets float32 [B] model times, as in
    `samplers.ode_sample`. `probe` is 'rademacher' (score_sde's default) or 'gaussian' (Hutchinson,
    `num_probes` of them averaged, drawn from `key` once), or 'exact' (D basis JVPs, `key` unused).
    `t_min` overrides the process's start time (score_sde integrates from 1e-5). The step size is
    shared by the batch. NFE counts augmented-drift evaluations (one network call each).
    Jittable as a whole with `key` and `x` traced; bad options raise `ConfigError` naming the
    `eval.ode_*` config field.
    """
    _check_probe(probe, num_probes)
    process = sde.as_process(schedule)
    t0 = _start_time(process, t_min)
    x = jnp.asarray(x, jnp.float32)
    drift = probability_flow(model_fn, process, prediction)
    probes, weight = _probes(key, probe, num_probes, x)
    state0 = (x, jnp.zeros(x.shape[:1], jnp.float32))
    (z, delta), nfe, _ = solve(
        _augmented_drift(drift, probes, weight), state0, t0, process.t_max, ode_solver, rtol, atol, max_steps,
        config_fields=("eval.ode_solver", "eval.ode_rtol", "eval.ode_atol"),
    )
    prior = process.prior_logp(z)
    return Likelihood(prior + delta, prior, delta, z, jnp.asarray(nfe, jnp.int32))


def bits_per_dim(
    log_p: jax.Array, num_dims: int, data_range: tuple[float, float] = (-1.0, 1.0), num_bins: int = 256
) -> jax.Array:
    """Bits/dim of discrete data from the continuous log-density `log_p` [B] (nats) of its
    dequantised, rescaled version (Theis et al. 2016, arXiv 1511.01844; Song et al. 2021):

        bpd = -log p(x) / (D ln 2) + log2(num_bins / (hi - lo)).

    Integer data k in {0..num_bins-1}^D dequantised to y = k + u in [0, num_bins)^D and rescaled
    to x = lo + (hi - lo) y / num_bins has density p_y(y) = p_x(x) ((hi - lo) / num_bins)^D (the
    Jacobian of y -> x), which is the density on the integer grid (unit bins). So
    -log2 p_y = -log2 p_x + D log2(num_bins / (hi - lo)): +7 bits/dim for [-1, 1] and 256 bins.
    A uniform density on [lo, hi]^D gives exactly log2(num_bins) bits/dim.
    """
    lo, hi = data_range
    if not hi > lo or num_bins < 1:
        raise ValueError(f"bits_per_dim: need data_range hi > lo and num_bins >= 1, got {data_range}, {num_bins}")
    return -log_p / (num_dims * math.log(2.0)) + math.log2(num_bins / (hi - lo))


def dequantize(key: jax.Array, images: jax.Array, num_bins: int = 256) -> jax.Array:
    """x = 2 (k + u) / num_bins - 1 with u ~ U[0, 1) per element: uniform dequantisation of integer
    images [B, ...] (uint8 for num_bins = 256) to float32 in [-1, 1] (Theis et al. 2016; as score_sde
    evaluates likelihoods). A density of x then bounds the discrete NLL from above (see `bits_per_dim`)."""
    u = jax.random.uniform(key, images.shape, jnp.float32)
    return 2.0 * (jnp.asarray(images, jnp.float32) + u) / num_bins - 1.0


def ode_bits_per_dim(
    model_fn: diffusion.ModelFn,
    schedule: Any,
    key: jax.Array,
    images: jax.Array,
    prediction: str = "eps",
    *,
    num_repeats: int = 1,
    num_bins: int = 256,
    probe: str = "rademacher",
    num_probes: int = 1,
    ode_solver: str = "tsit5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_steps: int = 4096,
    t_min: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(bits/dim [B] averaged over `num_repeats`, total NFE int32 []) of integer images [B, H, W, C]
    (Song et al. 2021, App. D.2; score_sde's likelihood evaluation with dataset repeats).

    Repeat r uses k_r = fold_in(key, r) and split(k_r) = (dequantisation key, probe key): it
    draws x = dequantize(...) and runs `ode_log_likelihood` on it (the model sees x in [-1, 1]),
    then converts with `bits_per_dim`. The result is seeded and reproducible; each repeat is an
    upper-bound estimate of the discrete NLL in bits/dim, and the average lowers its variance.
    Repeats run one after another in one `lax.map`, so memory is that of one solve.
    """
    if not isinstance(num_repeats, int) or num_repeats < 1:
        raise ConfigError(f"eval.ode_repeats: got {num_repeats!r}; expected an int >= 1")
    num_dims = math.prod(images.shape[1:])

    def one_repeat(r: jax.Array) -> tuple[jax.Array, jax.Array]:
        dequant_key, probe_key = jax.random.split(jax.random.fold_in(key, r))
        likelihood = ode_log_likelihood(
            model_fn, schedule, probe_key, dequantize(dequant_key, images, num_bins), prediction, probe=probe,
            num_probes=num_probes, ode_solver=ode_solver, rtol=rtol, atol=atol, max_steps=max_steps, t_min=t_min,
        )
        return bits_per_dim(likelihood.log_p, num_dims, (-1.0, 1.0), num_bins), likelihood.nfe

    bpd, nfe = jax.lax.map(one_repeat, jnp.arange(num_repeats))  # [R, B], [R]
    return jnp.mean(bpd, axis=0), jnp.sum(nfe)
