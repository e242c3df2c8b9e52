"""Two-dimensional toy distributions for diffusion experiments that run in seconds.

Each sampler is a pure function of `(rng, n)`: `rng` is an integer seed or a
`np.random.Generator`, and the result is a float32 array of shape [n, 2] whose
per-coordinate scale is about 1, the scale of the unit-variance noise that the
diffusion process adds. `DISTRIBUTIONS` maps the config names (`data.name`) to them.
"""

from collections.abc import Callable

import numpy as np

from diffusion_jax.registry import Registry

DISTRIBUTIONS: Registry[Callable[..., np.ndarray]] = Registry("toy distribution", "data.name")


def _generator(rng: int | np.random.Generator) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


@DISTRIBUTIONS.register("swiss_roll")
def swiss_roll(rng: int | np.random.Generator, n: int, *, noise: float = 0.5) -> np.ndarray:
    """The 2-D swiss roll of Sohl-Dickstein et al. 2015 (arXiv 1503.03585), Fig. 1.

    It is scikit-learn's `make_swiss_roll` projected onto its (x, z) plane:
    t ~ U[1.5π, 4.5π], point = (t cos t, t sin t) + noise·N(0, I), then divided
    by 7 so that each coordinate has a standard deviation of about 1.
    """
    gen = _generator(rng)
    t = 1.5 * np.pi * (1.0 + 2.0 * gen.random(n))
    points = np.stack([t * np.cos(t), t * np.sin(t)], axis=1)
    points += noise * gen.standard_normal((n, 2))
    return (points / 7.0).astype(np.float32)


def eight_gaussian_centres(radius: float = np.sqrt(2.0)) -> np.ndarray:
    """The 8 mixture centres of `eight_gaussians`: angles k·π/4 on a circle, [8, 2] float32."""
    angles = np.arange(8) * (np.pi / 4)
    return (radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)).astype(np.float32)


@DISTRIBUTIONS.register("eight_gaussians")
def eight_gaussians(
    rng: int | np.random.Generator, n: int, *, radius: float = np.sqrt(2.0), std: float = 0.15
) -> np.ndarray:
    """An equal-weight mixture of 8 isotropic Gaussians on a circle (as in FFJORD's 8gaussians).

    With the default radius √2 each coordinate has variance radius²/2 + std² ≈ 1.
    """
    gen = _generator(rng)
    centres = eight_gaussian_centres(radius)[gen.integers(0, 8, size=n)]
    return (centres + std * gen.standard_normal((n, 2))).astype(np.float32)


@DISTRIBUTIONS.register("two_moons")
def two_moons(rng: int | np.random.Generator, n: int, *, noise: float = 0.05) -> np.ndarray:
    """scikit-learn's `make_moons`: two interleaved half circles, centred and scaled.

    The upper moon is (cos θ, sin θ), the lower one (1 − cos θ, 0.5 − sin θ), θ ~ U[0, π],
    each point picked from either moon with probability 1/2, plus noise·N(0, I). The
    result is shifted by −(0.5, 0.25) (the mean) and divided by 0.7 so the mean
    per-coordinate variance is about 1 (standard deviations ≈ 1.2 and 0.7).
    """
    gen = _generator(rng)
    theta = np.pi * gen.random(n)
    lower = gen.random(n) < 0.5
    x = np.where(lower, 1.0 - np.cos(theta), np.cos(theta))
    y = np.where(lower, 0.5 - np.sin(theta), np.sin(theta))
    points = np.stack([x, y], axis=1) + noise * gen.standard_normal((n, 2))
    return ((points - np.array([0.5, 0.25])) / 0.7).astype(np.float32)
