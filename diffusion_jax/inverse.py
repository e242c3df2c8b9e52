"""Linear inverse problems: sampling p(x_0 | y) for a measurement y = A x_0 + σ_y n with an unconditional model.

Measurement operators A (`Operator`; each linear, its adjoint Aᵀ from `jax.linear_transpose`):

- `mask(m)`: y = m ⊙ x, the known pixels of inpainting (the rest 0);
- `blur(size, std)`: a separable Gaussian blur of `size` taps, zero-padded (deblurring);
- `downsample(factor)`: each output pixel the mean of a factor × factor block (`area_downsample`, also the A of
  `super_resolution`'s consistency constraint).

Posterior methods, each a transform of the denoiser that any sampler drives (`diffusion.with_x0`: the new x̂_0
becomes the prediction's own kind); with x_t = α_t x_0 + σ_t ε and J = ∂x̂_0/∂x_t:

- 'tweedie': Gaussian conditioning of x_0 | x_t on y, with Tweedie's covariance Cov[x_0 | x_t] = (σ_t²/α_t) J
  (Efron 2011; Boys et al. 2023, arXiv 2310.06721):
      x̂_0 + C Aᵀ (A C Aᵀ + σ_y² I)⁻¹ (y − A x̂_0),   C = (σ_t²/α_t) J,
  the system solved by conjugate gradients on Jacobian-vector products. For Gaussian data of any covariance
  x_0 | x_t is Gaussian and this is E[x_0 | x_t, y] exactly, so the samplers sample the exact posterior
  (`tests/test_inverse.py`). `inpaint.conditional_denoiser` is its σ_y = 0 mask case.
- 'pigdm': ΠGDM (Song, Vahdat, Mardani & Kautz, ICLR 2023, "Pseudoinverse-guided diffusion models for inverse
  problems", Eq. 7): the likelihood score with Cov[x_0 | x_t] ≈ r_t² I, r_t² = σ_t² / (α_t² + σ_t²) (data of unit
  variance), ∇_{x_t} log p(y | x_t) ≈ Jᵀ Aᵀ (r_t² A Aᵀ + σ_y² I)⁻¹ (y − A x̂_0), one vector-Jacobian product;
  x̂_0 moves by (σ_t²/α_t) times it (the score's ε − σ_t g of `guidance.classifier_guided`). Exact for data
  N(μ, I); an approximation otherwise.
- 'dps': DPS (Chung et al. 2022, arXiv 2209.14687, Algorithm 1): x̂_0 moved by −ζ ∇_{x_t} ‖y − A x̂_0(x_t)‖₂, the
  gradient of the residual norm (their normalised step size ζ_i = ζ / ‖y − A x̂_0‖ on the squared norm), taken
  in x̂_0 rather than in x_{t−1} so that one ζ means the same on every sampler. It ignores Cov[x_0 | x_t]: an
  approximation even for Gaussian data, which puts up with any (also non-linear) A.

`scale` multiplies each method's correction (1: as above; DPS's ζ).
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import diffusion
from diffusion_jax.errors import ConfigError

OPERATORS = ("mask", "blur", "downsample")
METHODS = ("tweedie", "pigdm", "dps")


class Operator(NamedTuple):
    """A linear measurement operator: `apply(x)` [B, H, W, C] -> y [B, ...] (batched per example)."""

    name: str
    apply: Callable[[jax.Array], jax.Array]

    def adjoint(self, x_like: jax.Array) -> Callable[[jax.Array], jax.Array]:
        """Aᵀ: y [B, ...] -> [B, H, W, C] for inputs shaped like `x_like`."""
        transpose = jax.linear_transpose(self.apply, jax.ShapeDtypeStruct(x_like.shape, x_like.dtype))
        return lambda y: transpose(y)[0]


def mask(m: jax.Array) -> Operator:
    """y = m ⊙ x: `m` [B, H, W, C] (or broadcastable) 1 where a pixel is measured, 0 elsewhere."""
    return Operator("mask", lambda x: jnp.asarray(m, x.dtype) * x)


def blur(size: int, std: float) -> Operator:
    """A Gaussian blur: `size` taps (odd) of a Gaussian of standard deviation `std` pixels, normalised to sum 1,
    along rows then columns, each channel alone, zero-padded to keep the image's size."""
    if size < 1 or size % 2 == 0 or std <= 0:
        raise ConfigError(f"inverse.blur_size, inverse.blur_std: got {size}, {std}; expected an odd size >= 1 and a "
                          "std > 0")
    offsets = np.arange(size) - size // 2
    taps = np.exp(-0.5 * (offsets / std) ** 2)
    taps = (taps / taps.sum()).astype(np.float32)

    def apply(x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        kernel = jnp.asarray(taps, x.dtype)
        for shape in ((size, 1, 1, c), (1, size, 1, c)):  # HWIO, one group per channel
            x = jax.lax.conv_general_dilated(
                x, jnp.broadcast_to(kernel.reshape(shape[:2] + (1, 1)), shape), (1, 1), "SAME",
                dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c,
            )
        return x

    return Operator("blur", apply)


def area_downsample(images: np.ndarray | jax.Array, size: int) -> np.ndarray | jax.Array:
    """[B, H, W, C] -> [B, size, size, C], each pixel the mean of its (H/size) x (W/size) block (area / box filter);
    H and W must be multiples of `size`. NumPy in, NumPy out; JAX in, JAX out."""
    b, h, w, c = images.shape
    return images.reshape(b, size, h // size, size, w // size, c).mean(axis=(2, 4))


def downsample(factor: int) -> Operator:
    """y [B, H/f, W/f, C]: the mean of each f × f block (H and W multiples of f; `area_downsample`)."""
    if factor < 1:
        raise ConfigError(f"inverse.factor: got {factor}; expected an int >= 1")
    return Operator("downsample", lambda x: area_downsample(x, x.shape[1] // factor))


def from_config(settings: Any, mask_array: np.ndarray | jax.Array | None = None) -> Operator:
    """The operator of `config.inverse` (`mask_array` [B, H, W, C]: the 'mask' operator's per-example masks)."""
    if settings.operator == "mask":
        return mask(mask_array)
    if settings.operator == "blur":
        return blur(settings.blur_size, settings.blur_std)
    if settings.operator == "downsample":
        return downsample(settings.factor)
    raise ConfigError(f"inverse.operator: unknown operator {settings.operator!r}; choose one of: "
                      f"{', '.join(OPERATORS)} (or None: no inverse problem)")


def check_config(settings: Any, example_shape: tuple[int, ...]) -> None:
    """One-line ConfigErrors for `config.inverse` fields that cannot work on images of `example_shape`."""
    _check_method(settings.method, settings.noise_std)
    if len(example_shape) != 3:
        raise ConfigError(f"inverse.operator: measures [H, W, C] images; this model makes {tuple(example_shape)}")
    from_config(settings, np.ones((1, *example_shape), np.float32))  # the operator's own checks
    if settings.operator == "downsample" and (example_shape[0] % settings.factor or example_shape[1] % settings.factor):
        raise ConfigError(f"inverse.factor: {settings.factor} does not divide the {example_shape[0]}x"
                          f"{example_shape[1]} images")


def measure(operator: Operator, x0: jax.Array, noise_std: float, key: jax.Array) -> jax.Array:
    """y = A x_0 + σ_y n, n ~ N(0, I)."""
    y = operator.apply(x0)
    return y + noise_std * jax.random.normal(key, y.shape, y.dtype)


def posterior_denoiser(
    model_fn: diffusion.ModelFn, process: Any, prediction: str, operator: Operator, y: jax.Array,
    noise_std: float, method: str = "tweedie", scale: float = 1.0, cg_steps: int = 8,
) -> diffusion.ModelFn:
    """`model_fn(x_t, t)` of the same `prediction` kind, denoising towards p(x_0 | x_t, y) by `method` (module
    docstring): 'tweedie' (exact for Gaussian data), 'pigdm' or 'dps'.

    Args:
        model_fn: the unconditional denoiser, `model_fn(x_t, t)` (a conditional one with its condition bound).
        process: gives (α_t, σ_t) of the model time t (`alpha_sigma(t)`).
        prediction: what `model_fn` predicts ('eps' | 'x0' | 'v' | 'velocity').
        operator: A; `y`: the measurement [B, ...] (`measure`), `noise_std`: σ_y ≥ 0.
        scale: multiplies the correction (DPS's ζ; 1 for the others' exact form).
        cg_steps: conjugate-gradient iterations of the 'tweedie' and 'pigdm' solves (exact after as many as y has
            entries per example; a few suffice when σ_y is not tiny).
    """
    correction = x0_correction(operator, y, noise_std, method, scale, cg_steps)
    return diffusion.with_x0(model_fn, process, prediction, correction)


def x0_correction(
    operator: Operator, y: jax.Array, noise_std: float, method: str = "tweedie", scale: float = 1.0,
    cg_steps: int = 8,
) -> diffusion.X0Change:
    """The `diffusion.with_x0` change of `posterior_denoiser`: (denoise, x_t, α_t, σ_t) -> the corrected x̂_0."""
    _check_method(method, noise_std)
    var_y = float(noise_std) ** 2

    def corrected(denoise: Callable[[jax.Array], jax.Array], x_t: jax.Array, alpha: jax.Array,
                  sigma: jax.Array) -> jax.Array:
        c = sigma**2 / alpha  # [B, 1, ...]: Cov[x_0 | x_t] = c J (Tweedie)
        adjoint = operator.adjoint(x_t)
        target = y.astype(x_t.dtype)
        if method == "tweedie":
            x0, jvp = jax.linearize(denoise, x_t)
            residual = target - operator.apply(x0)
            z = conjugate_gradient(lambda v: c * operator.apply(jvp(adjoint(v))) + var_y * v, residual, cg_steps)
            return x0 + scale * c * jvp(adjoint(z))
        if method == "pigdm":
            x0, vjp = jax.vjp(denoise, x_t)
            residual = target - operator.apply(x0)
            r2 = sigma**2 / (alpha**2 + sigma**2)
            z = conjugate_gradient(lambda v: r2 * operator.apply(adjoint(v)) + var_y * v, residual, cg_steps)
            return x0 + scale * c * vjp(adjoint(z))[0]

        def residual_norms(x: jax.Array) -> tuple[jax.Array, jax.Array]:
            x0 = denoise(x)
            r = target - operator.apply(x0)
            return jnp.sum(jnp.sqrt(jnp.sum(r**2, axis=tuple(range(1, r.ndim))) + 1e-12)), x0

        grad, x0 = jax.grad(residual_norms, has_aux=True)(x_t)  # per example: the norms are summed over the batch
        return x0 - scale * grad

    return corrected


def _check_method(method: str, noise_std: float) -> None:
    if method not in METHODS:
        raise ConfigError(f"inverse.method: unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    if noise_std < 0:
        raise ConfigError(f"inverse.noise_std: got {noise_std}; expected a float >= 0")


def conjugate_gradient(apply: Callable[[jax.Array], jax.Array], b: jax.Array, steps: int) -> jax.Array:
    """x with apply(x) ≈ b after `steps` iterations, per example: each example of the batch [B, ...] is its own
    symmetric positive (semi)definite system (Hestenes & Stiefel 1952); a converged example stays put."""
    axes = tuple(range(1, b.ndim))

    def dot(u: jax.Array, v: jax.Array) -> jax.Array:
        return jnp.sum(u * v, axis=axes, keepdims=True)  # [B, 1, ...]

    def step(carry: tuple, _: None) -> tuple[tuple, None]:
        x, r, p, rr = carry
        ap = apply(p)
        pap = dot(p, ap)
        a = jnp.where(pap > 0, rr / jnp.where(pap > 0, pap, 1.0), 0.0)
        x, r = x + a * p, r - a * ap
        rr_new = dot(r, r)
        p = r + jnp.where(rr > 0, rr_new / jnp.where(rr > 0, rr, 1.0), 0.0) * p
        return (x, r, p, rr_new), None

    (x, *_), _ = jax.lax.scan(step, (jnp.zeros_like(b), b, b, dot(b, b)), None, length=steps)
    return x
