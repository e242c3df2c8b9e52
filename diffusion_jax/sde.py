"""Continuous-time diffusion processes: score SDEs (Song et al. 2021, arXiv 2011.13456) and EDM's
sigma parameterisation (Karras et al. 2022, arXiv 2206.00364).

Each process is the forward SDE dx = f(x, t) dt + g(t) dw with Gaussian marginals
x_t = alpha(t) x_0 + sigma(t) eps, and exposes the same (alpha, sigma) view as a discrete
`schedules.Schedule` (DESIGN §4): `alpha_sigma(t)`, `log_snr(t)` and its inverse
`time_at_log_snr`. The samplers in `diffusion_jax.samplers` visit noise levels through that
view alone, so DDIM, DPM-Solver++, Euler/Heun and ancestral sampling run unchanged on these
processes; the predictor-corrector, Langevin and ODE samplers also use `sde`, `reverse_drift`
and `probability_flow_drift`.

The model time `t` is a float; a network trained on a process receives it as it was trained
(score_sde feeds 999 t to VP models and sigma(t) to VE models; EDM feeds c_noise(sigma)). The
methods accept NumPy or JAX arrays and return the same kind, so noise levels can be computed
once in float64 on the host.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.interpolate

from diffusion_jax.diffusion import per_example
from diffusion_jax.errors import ConfigError
from diffusion_jax.registry import Registry

Array = Any  # np.ndarray or jax.Array: every method keeps the kind it is given
ScoreFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x_t [B, ...], t [B]) -> grad log p_t(x_t)

PROCESSES: Registry[type] = Registry("process", "diffusion.process")


def _xp(t: Array) -> Any:
    """NumPy for NumPy inputs (float64 on the host), jax.numpy otherwise."""
    return np if isinstance(t, np.ndarray | float | int) else jnp


class Process(abc.ABC):
    """Shared behaviour of the continuous processes; each subclass gives its marginals and SDE."""

    t_min: float  # smallest time samplers visit (score_sde's sampling eps)
    t_max: float  # T

    @abc.abstractmethod
    def alpha_sigma(self, t: Array) -> tuple[Array, Array]:
        """(alpha(t), sigma(t)) of the marginal x_t = alpha x_0 + sigma eps."""

    @abc.abstractmethod
    def time_at_log_snr(self, log_snr: Array) -> Array:
        """The time t at which log(alpha^2 / sigma^2) equals `log_snr` (the inverse of `log_snr`)."""

    @abc.abstractmethod
    def sde(self, x: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(f(x, t) [B, ...], g(t) [B]) of dx = f dt + g dw, for t [B]."""

    @property
    @abc.abstractmethod
    def prior_std(self) -> float:
        """Standard deviation of the prior N(0, s^2 I) that x_{t_max} is drawn from."""

    def log_snr(self, t: Array) -> Array:
        """lambda(t) = log(alpha^2 / sigma^2), decreasing in t."""
        xp = _xp(t)
        alpha, sigma = self.alpha_sigma(t)
        return 2.0 * (xp.log(alpha) - xp.log(sigma))

    def reverse_drift(self, x: jax.Array, t: jax.Array, score: jax.Array) -> jax.Array:
        """Drift of the reverse-time SDE, f - g^2 score (Song et al. 2021, Eq. 6); t: [B]."""
        drift, diffusion = self.sde(x, t)
        return drift - per_example(diffusion, x) ** 2 * score

    def probability_flow_drift(self, x: jax.Array, t: jax.Array, score: jax.Array) -> jax.Array:
        """dx/dt of the probability-flow ODE, f - g^2 score / 2 (Song et al. 2021, Eq. 13)."""
        drift, diffusion = self.sde(x, t)
        return drift - 0.5 * per_example(diffusion, x) ** 2 * score

    def prior_sample(self, key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        """x_T ~ N(0, prior_std^2 I), float32 `shape`."""
        return self.prior_std * jax.random.normal(key, shape, jnp.float32)

    def prior_logp(self, x: jax.Array) -> jax.Array:
        """log N(x; 0, prior_std^2 I) summed over all but the batch axis, [B]."""
        d = math.prod(x.shape[1:])
        sq = jnp.sum(jnp.square(x.reshape(x.shape[0], -1)), axis=1)
        return -0.5 * d * math.log(2 * math.pi * self.prior_std**2) - 0.5 * sq / self.prior_std**2

    def sampling_times(self, steps: int, spacing: str, rho: float = 7.0) -> np.ndarray:
        """`steps` model times in [t_min, t_max], increasing, float64, following `spacing`:

        - 'linspace' (also 'uniform' and 'leading', which differ only in how discrete schedules round):
          uniform in t from t_min to t_max, as score_sde's samplers step;
        - 'trailing': uniform in t, the top at t_max and the bottom one interval above t_min, the grid of
          Euler steps on a flow (Liu et al. 2022): 1 step is t_max -> clean data, 2 steps stop midway;
        - 'quadratic': t_min + (t_max - t_min) u^2 for uniform u (DDIM's quadratic, continuous);
        - 'logsnr': uniform in lambda (DPM-Solver, Lu et al. 2022, §3.3);
        - 'karras': EDM's sigma_i ramp with exponent rho in the scale sigma/alpha (Eq. 5).
        """
        if not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"sample.steps: got {steps!r}; expected an int >= 1")
        u = np.linspace(0.0, 1.0, steps)
        if spacing in ("linspace", "uniform", "leading"):
            return self.t_min + (self.t_max - self.t_min) * u
        if spacing == "trailing":
            return self.t_min + (self.t_max - self.t_min) * np.arange(1, steps + 1) / steps
        if spacing == "quadratic":
            return self.t_min + (self.t_max - self.t_min) * u**2
        lam_lo, lam_hi = self.log_snr(np.float64(self.t_max)), self.log_snr(np.float64(self.t_min))
        if spacing == "logsnr":
            lam = lam_hi + (lam_lo - lam_hi) * u
        elif spacing == "karras":
            s_lo, s_hi = np.exp(-0.5 * lam_hi) ** (1 / rho), np.exp(-0.5 * lam_lo) ** (1 / rho)
            lam = -2.0 * rho * np.log(s_lo + u * (s_hi - s_lo))
        else:
            raise ConfigError(
                "sample.spacing: unknown spacing "
                f"{spacing!r}; choose one of: karras, leading, linspace, logsnr, quadratic, trailing, uniform"
            )
        times = np.clip(self.time_at_log_snr(lam), self.t_min, self.t_max)
        times[0], times[-1] = self.t_min, self.t_max  # exact ends despite round-off
        return times


@PROCESSES.register("vp")
@dataclasses.dataclass(frozen=True)
class VPSDE(Process):
    """Variance-preserving SDE, dx = -beta(t) x / 2 dt + sqrt(beta(t)) dw, beta(t) linear from
    beta_min to beta_max on [0, 1] (Song et al. 2021, Eq. 11; the continuous limit of DDPM's
    linear schedule with T = 1000 for the defaults). alpha(t) = exp(-t^2 (b1 - b0)/4 - t b0/2),
    sigma^2 = 1 - alpha^2."""

    beta_min: float = 0.1
    beta_max: float = 20.0
    t_min: float = 1e-3
    t_max: float = 1.0

    def beta(self, t: Array) -> Array:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def log_alpha(self, t: Array) -> Array:
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def alpha_sigma(self, t: Array) -> tuple[Array, Array]:
        xp = _xp(t)
        log_alpha = self.log_alpha(t)
        return xp.exp(log_alpha), xp.sqrt(-xp.expm1(2.0 * log_alpha))

    def _time_at_log_alpha(self, log_alpha: Array) -> Array:
        """The root t >= 0 of (b1 - b0) t^2 / 4 + b0 t / 2 + log_alpha = 0."""
        xp = _xp(log_alpha)
        a, b = 0.25 * (self.beta_max - self.beta_min), 0.5 * self.beta_min
        if a == 0.0:
            return -log_alpha / b
        return 2.0 * -log_alpha / (b + xp.sqrt(b**2 - 4.0 * a * log_alpha))  # stable root form

    def time_at_log_snr(self, log_snr: Array) -> Array:
        xp = _xp(log_snr)
        # alpha^2 = sigmoid(lambda), so log alpha = -softplus(-lambda) / 2.
        return self._time_at_log_alpha(-0.5 * xp.logaddexp(0.0, -log_snr))

    def sde(self, x: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        beta = self.beta(t)
        return -0.5 * per_example(beta, x) * x, jnp.sqrt(beta)

    @property
    def prior_std(self) -> float:
        return 1.0


@PROCESSES.register("subvp")
@dataclasses.dataclass(frozen=True)
class SubVPSDE(VPSDE):
    """Sub-VP SDE, dx = -beta x / 2 dt + sqrt(beta (1 - exp(-2 int_0^t beta))) dw (Song et al. 2021,
    Eq. 12): the VP mean with sigma(t) = 1 - alpha(t)^2, always below the VP's."""

    def alpha_sigma(self, t: Array) -> tuple[Array, Array]:
        xp = _xp(t)
        log_alpha = self.log_alpha(t)
        return xp.exp(log_alpha), -xp.expm1(2.0 * log_alpha)

    def time_at_log_snr(self, log_snr: Array) -> Array:
        xp = _xp(log_snr)
        # lambda = log a - 2 log(1 - a) with a = alpha^2: e^-lambda a = (1 - a)^2, whose root in
        # (0, 1) is 1 - a = 2 / (1 + sqrt(1 + 4 e^lambda)) * ... written stably via c = e^{-lambda/2}:
        # 1 - a = c (sqrt(c^2 + 4) - c) / 2.
        c = xp.exp(-0.5 * log_snr)
        one_minus_a = 0.5 * c * (xp.sqrt(c**2 + 4.0) - c)
        return self._time_at_log_alpha(0.5 * xp.log1p(-one_minus_a))

    def sde(self, x: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        beta = self.beta(t)
        return -0.5 * per_example(beta, x) * x, jnp.sqrt(-beta * jnp.expm1(4.0 * self.log_alpha(t)))


@PROCESSES.register("ve")
@dataclasses.dataclass(frozen=True)
class VESDE(Process):
    """Variance-exploding SDE of NCSN / SMLD, sigma(t) = sigma_min (sigma_max / sigma_min)^t, alpha = 1,
    dx = sigma(t) sqrt(2 log(sigma_max / sigma_min)) dw (Song et al. 2021, Eq. 9 and App. C)."""

    sigma_min: float = 0.01
    sigma_max: float = 50.0
    t_min: float = 1e-5
    t_max: float = 1.0

    def sigma(self, t: Array) -> Array:
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def alpha_sigma(self, t: Array) -> tuple[Array, Array]:
        return _xp(t).ones_like(t), self.sigma(t)

    def time_at_log_snr(self, log_snr: Array) -> Array:
        return (-0.5 * log_snr - math.log(self.sigma_min)) / math.log(self.sigma_max / self.sigma_min)

    def sde(self, x: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        return jnp.zeros_like(x), self.sigma(t) * math.sqrt(2.0 * math.log(self.sigma_max / self.sigma_min))

    @property
    def prior_std(self) -> float:
        return self.sigma_max


@PROCESSES.register("edm")
@dataclasses.dataclass(frozen=True)
class EDM(Process):
    """EDM's process (Karras et al. 2022, Table 1): sigma(t) = t, alpha = 1, so the model time
    *is* sigma; dx = sqrt(2 t) dw and the probability-flow ODE is dx/dsigma = (x - D(x; sigma)) / sigma.
    Defaults are EDM's sampling range sigma in [0.002, 80] and sigma_data = 0.5."""

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5

    @property
    def t_min(self) -> float:
        return self.sigma_min

    @property
    def t_max(self) -> float:
        return self.sigma_max

    def alpha_sigma(self, t: Array) -> tuple[Array, Array]:
        return _xp(t).ones_like(t), t

    def time_at_log_snr(self, log_snr: Array) -> Array:
        return _xp(log_snr).exp(-0.5 * log_snr)

    def sde(self, x: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        return jnp.zeros_like(x), jnp.sqrt(2.0 * t)

    @property
    def prior_std(self) -> float:
        return self.sigma_max


@PROCESSES.register("flow")
@dataclasses.dataclass(frozen=True)
class Flow(Process):
    """The linear interpolant of flow matching and rectified flow (Lipman et al. 2022, arXiv 2210.02747;
    Liu et al. 2022, arXiv 2209.03003): x_t = (1 - t) x_0 + t eps, so alpha = 1 - t, sigma = t and
    log-SNR = 2 log((1 - t) / t). Its velocity u = dx_t/dt = eps - x_0 (prediction 'velocity') drives the
    ODE dx/dt = u, whose Euler step is DDIM's step on this (alpha, sigma) view. As an SDE with these
    marginals: f = d log alpha / dt = -1 / (1 - t), g^2 = d sigma^2/dt - 2 f sigma^2 = 2 t / (1 - t).
    t_max stops short of 1, where alpha = 0 and the log-SNR is -inf (the prior N(0, I) is then off by
    1e-3 x_0)."""

    t_min: float = 1e-3
    t_max: float = 1.0 - 1e-3

    def alpha_sigma(self, t: Array) -> tuple[Array, Array]:
        return 1.0 - t, t

    def time_at_log_snr(self, log_snr: Array) -> Array:
        xp = _xp(log_snr)
        return 1.0 / (1.0 + xp.exp(0.5 * log_snr))  # (1 - t) / t = e^{lambda / 2}

    def sde(self, x: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        return -per_example(1.0 / (1.0 - t), x) * x, jnp.sqrt(2.0 * t / (1.0 - t))

    @property
    def prior_std(self) -> float:
        return 1.0


@dataclasses.dataclass(frozen=True, eq=False)
class DiscreteVP(Process):
    """The continuous-time view of a discrete variance-preserving schedule: log alpha through the
    model times the schedule was trained at, interpolated by a cubic spline (DPM-Solver's
    'discrete' noise schedule, Lu et al. 2022, App. D, interpolates linearly; a C^2 spline keeps
    the probability-flow ODE smooth, which cut an adaptive solver's NFE 8x on Gaussian data).
    The model time t is a float in [t_0, t_{T-1}] (a network with a sinusoidal time embedding
    takes fractional timesteps), so the probability-flow ODE and the Euler-Maruyama predictor run
    on models trained with `schedules.Schedule`. f = d log alpha / dt and g^2 = -2 f, as for any
    VP process. `time_at_log_snr` inverts linearly between knots (exact at the knots).
    """

    knots: np.ndarray  # float64 [T]: model times (the schedule's `timesteps`)
    log_alphas: np.ndarray  # float64 [T]: log alpha at the knots, decreasing

    @classmethod
    def from_schedule(cls, schedule: Any) -> DiscreteVP:
        return cls(np.asarray(schedule.timesteps, np.float64), np.log(np.asarray(schedule.alpha, np.float64)))

    @functools.cached_property
    def _spline(self) -> np.ndarray:
        """Cubic coefficients [4, T - 1]: on segment i, log alpha = sum_k c[k, i] (t - t_i)^(3 - k)."""
        return scipy.interpolate.CubicSpline(self.knots, self.log_alphas).c

    def _segment(self, t: Array) -> tuple[Array, Array, Array]:
        """(the spline's coefficients on t's segment [4, ...], t - t_i, xp)."""
        xp = _xp(t)
        coef, knots = (self._spline, self.knots) if xp is np else (jnp.asarray(self._spline, jnp.float32),
                                                                     jnp.asarray(self.knots, jnp.float32))
        segment = xp.clip(xp.searchsorted(knots, t, side="right") - 1, 0, coef.shape[1] - 1)
        return coef[:, segment], t - knots[segment], xp

    @property
    def t_min(self) -> float:
        return float(self.knots[0])

    @property
    def t_max(self) -> float:
        return float(self.knots[-1])

    def log_alpha(self, t: Array) -> Array:
        c, dt, _ = self._segment(t)
        return ((c[0] * dt + c[1]) * dt + c[2]) * dt + c[3]

    def alpha_sigma(self, t: Array) -> tuple[Array, Array]:
        xp = _xp(t)
        log_alpha = self.log_alpha(t)
        return xp.exp(log_alpha), xp.sqrt(-xp.expm1(2.0 * log_alpha))

    def time_at_log_snr(self, log_snr: Array) -> Array:
        xp = _xp(log_snr)
        log_alpha = -0.5 * xp.logaddexp(0.0, -log_snr)
        return xp.interp(-log_alpha, -self.log_alphas, self.knots)  # interp needs increasing abscissae

    def sde(self, x: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        c, dt, _ = self._segment(t)
        f = jnp.minimum((3.0 * c[0] * dt + 2.0 * c[1]) * dt + c[2], 0.0)  # d log alpha / dt <= 0
        return per_example(f, x) * x, jnp.sqrt(-2.0 * f)

    @property
    def prior_std(self) -> float:
        return 1.0


def as_process(process: Any) -> Process:
    """`process` itself if continuous; the `DiscreteVP` view of a discrete `schedules.Schedule`."""
    return process if isinstance(process, Process) else DiscreteVP.from_schedule(process)


def get(name: str, **kwargs: float) -> Process:
    """The process registered as `name` ('vp' | 'subvp' | 've' | 'edm' | 'flow') with its parameters."""
    return PROCESSES.get(name)(**kwargs)


# --- EDM preconditioning (Karras et al. 2022, Table 1 and §5) ------------------------------


class Preconditioning(NamedTuple):
    """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise), coefficients broadcastable against x."""

    c_skip: jax.Array
    c_out: jax.Array
    c_in: jax.Array
    c_noise: jax.Array


PRECONDITIONINGS = ("edm", "ve", "vp")


def preconditioning(
    kind: str, sigma: jax.Array, sigma_data: float = 0.5, vp: VPSDE | None = None, num_train_steps: int = 1000
) -> Preconditioning:
    """The coefficients of Karras et al. Table 1 at noise level sigma (in the scale alpha = 1):

    - 'edm': c_skip = s_d^2 / (sigma^2 + s_d^2), c_out = sigma s_d / sqrt(sigma^2 + s_d^2),
      c_in = 1 / sqrt(sigma^2 + s_d^2), c_noise = ln(sigma) / 4;
    - 've' (NCSN++): c_skip = 1, c_out = sigma, c_in = 1, c_noise = ln(sigma / 2);
    - 'vp' (DDPM++): c_skip = 1, c_out = -sigma, c_in = 1 / sqrt(sigma^2 + 1),
      c_noise = (M - 1) t(sigma), t the VP time of `vp` at which sigma/alpha = sigma.
    """
    if kind == "edm":
        norm = jnp.sqrt(sigma**2 + sigma_data**2)
        return Preconditioning(sigma_data**2 / norm**2, sigma * sigma_data / norm, 1.0 / norm, 0.25 * jnp.log(sigma))
    if kind == "ve":
        return Preconditioning(jnp.ones_like(sigma), sigma, jnp.ones_like(sigma), jnp.log(0.5 * sigma))
    if kind == "vp":
        vp = vp or VPSDE()
        t = vp.time_at_log_snr(-2.0 * jnp.log(sigma))
        return Preconditioning(jnp.ones_like(sigma), -sigma, 1.0 / jnp.sqrt(sigma**2 + 1.0), (num_train_steps - 1) * t)
    raise ConfigError(f"model.preconditioning: unknown {kind!r}; choose one of: {', '.join(PRECONDITIONINGS)}")


def precondition(
    backbone: Callable[[jax.Array, jax.Array], jax.Array], kind: str = "edm", sigma_data: float = 0.5,
    c_noise_scale: float = 1.0,
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """Wraps a raw network F(x, c_noise) into EDM's denoiser D(x; sigma) (Karras et al. Eq. 7).

    The result is a `model_fn(x [B, ...], sigma [B]) -> x̂_0` with prediction='x0', the
    model function of the `EDM` process (whose model time is sigma); any backbone that takes
    (x, noise-conditioning [B]) works; it gets `c_noise_scale` c_noise (1000 for a network that embeds
    DDPM's timesteps, `models.Preconditioned`).
    """
    if kind not in PRECONDITIONINGS:
        raise ConfigError(f"model.preconditioning: unknown {kind!r}; choose one of: {', '.join(PRECONDITIONINGS)}")

    def denoiser(x: jax.Array, sigma: jax.Array) -> jax.Array:
        c = preconditioning(kind, sigma, sigma_data)
        out = backbone(per_example(c.c_in, x) * x, c_noise_scale * c.c_noise)
        return per_example(c.c_skip, x) * x + per_example(c.c_out, x) * out

    return denoiser
