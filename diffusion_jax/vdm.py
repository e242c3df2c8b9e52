"""Variational diffusion models (Kingma et al. 2021, arXiv 2107.00630): a learned monotonic noise schedule
and the continuous-time variational bound, as pure functions.

The process is variance preserving with σ_t² = sigmoid(γ(t)), α_t² = sigmoid(-γ(t)), SNR(t) = exp(-γ(t))
(Eqs. 3-5), γ increasing on t in [0, 1]. For data x (D dimensions) the negative VLB is

    L = KL(q(z_1 | x) || N(0, I))  +  E_{z_0}[-log p(x | z_0)]  +  ½ E_{t ~ U(0, 1), ε} [γ'(t) ||ε - ε̂(z_t; t)||²]

(prior, reconstruction and the continuous-time diffusion loss, Eq. 17). Only γ's endpoints γ(0), γ(1)
change L's expectation (§5.1: the continuous VLB is invariant to the schedule between them); the
schedule's shape changes its variance, so VDM learns the endpoints on L and the shape on L's variance
(§5.3, App. I.2), which `vdm_objective` arranges with stop-gradients. t is drawn antithetically (one
uniform offset, then evenly spaced: t_i = (u + i / B) mod 1, App. I.1). The decoder is the
discretised one of 8-bit data (each dimension a softmax over the 256 grid values, App. C) or, for
continuous data, the Gaussian N(x; z_0 / α_0, σ_0² / α_0²). `fourier_features` are the input
features sin/cos(2^n π z) of §3.4.

The network ε̂(z_t; γ_t) sees the noise level as γ_t, as VDM's does (`models.VDMNetwork`: Fourier
features of z_t into any backbone, γ_t as its time), so the schedule's shape is the network's to read.

`LearnedVP` is the sampler's view of a learned γ: a process evaluated from γ's parameters once, on the
host, so every sampler drives a VDM through its (α, σ) view. `LearnedSchedule` is `diffusion.process='vdm'`
before there are parameters: the train loop, the eval mode and `dj.load` bind it to the γ of the
parameters they sample with (`training.setup.bind_process`).
"""

import dataclasses
import functools
import hashlib
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion_jax import sde
from diffusion_jax.diffusion import per_example

GammaFn = Callable[[jax.Array], jax.Array]  # t [B] in [0, 1] -> γ(t) [B], increasing
EpsFn = Callable[[jax.Array, jax.Array], jax.Array]  # (z_t [B, ...], γ_t [B]) -> ε̂ [B, ...]


class MonotonicGamma(nnx.Module):
    """VDM's learned schedule (App. H): γ̃(t) = l1(t) + l3(sigmoid(l2(l1(t)))) with non-negative weights
    (|w|), so γ̃ is increasing, rescaled to run exactly from the learned endpoints:
    γ(t) = γ_0 + (γ_1 - γ_0) (γ̃(t) - γ̃(0)) / (γ̃(1) - γ̃(0)). Defaults: VDM's CIFAR-10 endpoints."""

    def __init__(self, gamma_0: float = -13.3, gamma_1: float = 5.0, hidden: int = 1024, *, rngs: nnx.Rngs):
        self.gamma_0 = nnx.Param(jnp.asarray(gamma_0, jnp.float32))
        self.gamma_1 = nnx.Param(jnp.asarray(gamma_1, jnp.float32))
        self.l1_w = nnx.Param(jnp.ones((1, 1), jnp.float32))
        self.l1_b = nnx.Param(jnp.zeros((1,), jnp.float32))
        self.l2_w = nnx.Param(jax.random.normal(rngs.params(), (1, hidden), jnp.float32))
        self.l2_b = nnx.Param(jnp.zeros((hidden,), jnp.float32))
        self.l3_w = nnx.Param(jax.random.normal(rngs.params(), (hidden, 1), jnp.float32) / hidden)

    def shape(self, t: jax.Array) -> jax.Array:
        """γ̃(t), [B] -> [B], increasing."""
        h = t[:, None] * jnp.abs(self.l1_w.value) + self.l1_b.value
        return (h + jax.nn.sigmoid(h @ jnp.abs(self.l2_w.value) + self.l2_b.value) @ jnp.abs(self.l3_w.value))[:, 0]

    def __call__(self, t: jax.Array) -> jax.Array:
        ends = self.shape(jnp.asarray([0.0, 1.0], jnp.float32))
        unit = (self.shape(t) - ends[0]) / (ends[1] - ends[0])
        return self.gamma_0.value + (self.gamma_1.value - self.gamma_0.value) * unit


def alpha_sigma(gamma: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(α, σ) of γ: α² = sigmoid(-γ), σ² = sigmoid(γ) (Eq. 4)."""
    return jnp.sqrt(jax.nn.sigmoid(-gamma)), jnp.sqrt(jax.nn.sigmoid(gamma))


def antithetic_times(key: jax.Array, batch_size: int) -> jax.Array:
    """t_i = (u + i / B) mod 1, u ~ U(0, 1): float32 [B] (App. I.1; lower-variance than i.i.d. t)."""
    return jnp.mod(jax.random.uniform(key, ()) + jnp.arange(batch_size) / batch_size, 1.0)


def fourier_features(z: jax.Array, n_min: int = 6, n_max: int = 7) -> jax.Array:
    """z [..., C] -> [..., C (1 + 2 (n_max - n_min + 1))]: z with sin and cos of 2^n π z, n = n_min..n_max (§3.4:
    the fine scales of 8-bit data, which a network struggles to see when the SNR is high; n = 6, 7 as in
    google-research/vdm's `ScoreUNet`)."""
    freqs = 2.0 ** jnp.arange(n_min, n_max + 1) * math.pi  # [F]
    angles = z[..., None] * freqs  # [..., C, F]
    features = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
    return jnp.concatenate([z, features.reshape(*z.shape[:-1], -1)], axis=-1)


def prior_loss(x: jax.Array, gamma_1: jax.Array) -> jax.Array:
    """KL(N(α_1 x, σ_1² I) || N(0, I)) per example [B], in nats."""
    alpha, sigma = alpha_sigma(gamma_1)
    d = 0.5 * (sigma**2 + alpha**2 * jnp.square(x) - 1.0 - 2.0 * jnp.log(sigma))
    return jnp.sum(d.reshape(x.shape[0], -1), axis=1)


def reconstruction_loss(x: jax.Array, eps_0: jax.Array, gamma_0: jax.Array, grid: jax.Array | None) -> jax.Array:
    """-log p(x | z_0), z_0 = α_0 x + σ_0 ε_0, per example [B] in nats: over the values `grid` [V] that each
    dimension of x takes (VDM's discretised decoder, a softmax of -(z_0 / α_0 - v)² / (2 σ_0² / α_0²) over v),
    or with `grid=None` the Gaussian N(x; z_0 / α_0, σ_0² / α_0²) of continuous data."""
    alpha, sigma = alpha_sigma(gamma_0)
    x_hat = x + (sigma / alpha) * eps_0  # z_0 / α_0
    var = jnp.exp(gamma_0)  # σ_0² / α_0²
    if grid is None:
        nll = 0.5 * (jnp.square(x - x_hat) / var + jnp.log(2.0 * math.pi * var))
    else:
        logits = -0.5 * jnp.square(x_hat[..., None] - grid) / var  # [..., V]
        target = -0.5 * jnp.square(x_hat - x) / var
        nll = jax.nn.logsumexp(logits, axis=-1) - target
    return jnp.sum(nll.reshape(x.shape[0], -1), axis=1)


def noise_error(eps_fn: EpsFn, gamma_fn: GammaFn, x: jax.Array, t: jax.Array, eps: jax.Array
                ) -> tuple[jax.Array, jax.Array]:
    """(γ'(t), ||ε - ε̂(z_t; γ_t)||²) per example [B] each, z_t = α_t x + σ_t ε."""
    gamma, dgamma = jax.jvp(gamma_fn, (t,), (jnp.ones_like(t),))
    alpha, sigma = alpha_sigma(gamma)
    z_t = per_example(alpha, x) * x + per_example(sigma, x) * eps
    error = jnp.square(eps - eps_fn(z_t, gamma).astype(jnp.float32)).reshape(x.shape[0], -1)
    return dgamma, jnp.sum(error, axis=1)


def vlb(
    eps_fn: EpsFn, gamma_fn: GammaFn, x: jax.Array, key: jax.Array, grid: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """The negative VLB's three terms per example, in nats [B]: {'prior', 'reconstruction', 'diffusion'}, and
    their sum in bits per dimension ('bpd'); t antithetic, one sample of ε per term. Also the draws behind the
    diffusion term: 't' and 'noise_error' (||ε - ε̂||²), each [B]."""
    t_key, eps_key, eps0_key = jax.random.split(key, 3)
    ends = gamma_fn(jnp.asarray([0.0, 1.0], jnp.float32))
    t = antithetic_times(t_key, x.shape[0])
    dgamma, error = noise_error(eps_fn, gamma_fn, x, t, jax.random.normal(eps_key, x.shape))
    terms = {
        "prior": prior_loss(x, ends[1]),
        "reconstruction": reconstruction_loss(x, jax.random.normal(eps0_key, x.shape), ends[0], grid),
        "diffusion": 0.5 * dgamma * error,
    }
    total = terms["prior"] + terms["reconstruction"] + terms["diffusion"]
    return terms | {"bpd": total / bits_per_nat_factor(x.shape[1:]), "t": t, "noise_error": error}


def bits_per_nat_factor(example_shape: tuple[int, ...]) -> float:
    """D ln 2 of examples of `example_shape`: nats per example / this = bits per dimension."""
    return math.prod(example_shape) * math.log(2.0)


def vdm_objective(
    eps_fn: EpsFn, gamma: MonotonicGamma, x: jax.Array, key: jax.Array, grid: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The batch mean of the negative VLB in bits/dim, whose gradient is VDM's: the VLB's for the network and
    γ's endpoints, ½ d/dη E[L²] = E[L dL/dη] (the estimator's variance, §5.3) for γ's shape parameters η.

    L is evaluated once, with the shape under stop_gradient (for the network and the endpoints). L depends on the
    shape only through the diffusion term's γ'(t) (the prior and the decoder read the endpoints alone), so dL/dη is
    that of ½ γ'(t) ||ε - ε̂||² with the endpoints and ε̂ held: one network evaluation per step, and the shape's
    gradient does not follow γ_t through the network's input. The value returned is the VLB itself.
    """
    graphdef, params = nnx.split(gamma)
    frozen = jax.lax.stop_gradient

    def is_end(path: tuple) -> bool:
        return any(getattr(k, "key", getattr(k, "name", None)) in ("gamma_0", "gamma_1") for k in path)

    def gamma_with(shape_frozen: bool) -> GammaFn:
        """γ with its shape (True) or its endpoints (False) under stop_gradient."""
        kept = jax.tree_util.tree_map_with_path(lambda path, p: frozen(p) if is_end(path) != shape_frozen else p,
                                                params)
        return lambda t: nnx.merge(graphdef, kept)(t)

    terms = vlb(eps_fn, gamma_with(shape_frozen=True), x, key, grid)
    _, shape_slope = jax.jvp(gamma_with(shape_frozen=False), (terms["t"],), (jnp.ones_like(terms["t"]),))
    shape_loss = 0.5 * shape_slope * frozen(terms["noise_error"]) / bits_per_nat_factor(x.shape[1:])
    loss = terms["bpd"]
    surrogate = jnp.mean(loss) + jnp.mean(frozen(loss) * (shape_loss - frozen(shape_loss)))
    return surrogate, {k: jnp.mean(terms[k]) for k in ("prior", "reconstruction", "diffusion", "bpd")}


@dataclasses.dataclass(frozen=True, eq=False)
class LearnedVP(sde.Process):
    """The variance-preserving process of a learned schedule γ, for the samplers: σ² = sigmoid(γ(t)),
    α² = sigmoid(-γ(t)) on t in [t_min, 1]. γ and γ' are tabulated once in float64 on `knots` (`from_gamma`)
    and interpolated linearly between them, so the host-side noise levels of every sampler and the traced
    drift agree; γ is increasing, so `time_at_log_snr` inverts the table. As an SDE: f = d log α/dt =
    -σ² γ'/2 and g² = dσ²/dt - 2 f σ² = σ² γ'."""

    knots: np.ndarray  # float64 [K]: times, increasing from 0 to 1
    gammas: np.ndarray  # float64 [K]: γ at the knots, increasing
    slopes: np.ndarray  # float64 [K]: γ' at the knots
    t_min: float = 1e-3
    t_max: float = 1.0

    @functools.cached_property
    def fingerprint(self) -> str:
        """A digest of the tables: equal processes (the same γ) compare and hash equal, so a function compiled
        for one is reused for the other."""
        digest = hashlib.sha256(repr((self.t_min, self.t_max)).encode())
        for table in (self.knots, self.gammas, self.slopes):
            digest.update(np.ascontiguousarray(table, np.float64).tobytes())
        return digest.hexdigest()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LearnedVP) and other.fingerprint == self.fingerprint

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    @classmethod
    def from_gamma(cls, gamma_fn: GammaFn, num_knots: int = 4097, t_min: float = 1e-3) -> "LearnedVP":
        """The process of `gamma_fn` (e.g. a `MonotonicGamma` with the EMA's parameters)."""
        knots = np.linspace(0.0, 1.0, num_knots)
        t = jnp.asarray(knots, jnp.float32)
        gamma, slope = jax.jvp(gamma_fn, (t,), (jnp.ones_like(t),))
        return cls(knots, np.asarray(gamma, np.float64), np.asarray(slope, np.float64), t_min=t_min)

    @property
    def _tables(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        # Made afresh at each use: a cached jax array first made inside a trace would be a leaked tracer.
        return tuple(jnp.asarray(a, jnp.float32) for a in (self.knots, self.gammas, self.slopes))

    def _gamma(self, t: sde.Array) -> tuple[sde.Array, sde.Array]:
        if isinstance(t, np.ndarray | float | int):
            return np.interp(t, self.knots, self.gammas), np.interp(t, self.knots, self.slopes)
        knots, gammas, slopes = self._tables
        return jnp.interp(t, knots, gammas), jnp.interp(t, knots, slopes)

    def alpha_sigma(self, t: sde.Array) -> tuple[sde.Array, sde.Array]:
        gamma, _ = self._gamma(t)
        xp = np if isinstance(gamma, np.ndarray | float) else jnp
        return xp.sqrt(1.0 / (1.0 + xp.exp(gamma))), xp.sqrt(1.0 / (1.0 + xp.exp(-gamma)))

    def time_at_log_snr(self, log_snr: sde.Array) -> sde.Array:
        if isinstance(log_snr, np.ndarray | float | int):
            return np.interp(-np.asarray(log_snr), self.gammas, self.knots)  # log SNR = -γ
        knots, gammas, _ = self._tables
        return jnp.interp(-log_snr, gammas, knots)

    def sde(self, x: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        gamma, slope = self._gamma(t)
        sigma2 = jax.nn.sigmoid(gamma)
        return -0.5 * per_example(sigma2 * slope, x) * x, jnp.sqrt(sigma2 * slope)

    @property
    def prior_std(self) -> float:
        return 1.0


@dataclasses.dataclass(frozen=True)
class LearnedSchedule:
    """`diffusion.process='vdm'` before its parameters exist: the schedule is the model's γ (`models.VDMNetwork`),
    so the process a sampler drives is `bind(γ)`'s, built from the parameters it samples with
    (`training.setup.bind_process`). Not a process itself, so nothing samples an unbound VDM by mistake.
    `gamma_min`, `gamma_max` are γ's initial endpoints and the range the network's time input is scaled by."""

    gamma_min: float = -13.3
    gamma_max: float = 5.0

    def bind(self, gamma_fn: GammaFn) -> LearnedVP:
        """The process of the learned schedule `gamma_fn`."""
        return LearnedVP.from_gamma(gamma_fn)

    def nominal(self) -> LearnedVP:
        """The linear schedule between the initial endpoints: a stand-in for checks that trace a sampler before
        any parameters exist (`training.setup.check_config`), never for sampling a model."""
        return LearnedVP.from_gamma(lambda t: self.gamma_min + (self.gamma_max - self.gamma_min) * t, num_knots=65)
