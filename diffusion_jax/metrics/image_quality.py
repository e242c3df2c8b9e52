"""Full-reference image quality: PSNR and SSIM per image, for autoencoder reconstructions.

Images are [B, H, W, C] arrays in [-1, 1] by default (the data range 2 of DESIGN §4's
batches); pass `data_range` for other ranges (1.0 for [0, 1], 255.0 for uint8 values).
Both are computed in float32 and return one value per image, [B].

SSIM follows Wang et al. 2004, "Image Quality Assessment: From Error Visibility to
Structural Similarity" (IEEE TIP 13(4)), eq. (13) with the Gaussian window of §III.C
(11 x 11, sigma 1.5, K1 = 0.01, K2 = 0.03), computed per channel and averaged, exactly as
scikit-image's `structural_similarity(x, y, data_range=..., channel_axis=-1,
gaussian_weights=True, sigma=1.5, use_sample_covariance=False)`:

    mu_x = w * x, sigma_x^2 = w * x^2 - mu_x^2, sigma_xy = w * (x y) - mu_x mu_y   (w: the Gaussian filter)
    SSIM map = (2 mu_x mu_y + C1)(2 sigma_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(sigma_x^2 + sigma_y^2 + C2))
    C1 = (K1 L)^2, C2 = (K2 L)^2, L = data_range,

averaged over the positions whose window lies inside the image (the map cropped by
(win_size - 1) / 2 on each side) and over channels. With win_size 11 that is a valid-only
convolution with the 11 x 11 window.

Small images. An 11 x 11 window needs H, W >= 11. For smaller images the window is the
largest odd size that fits, win_size = min(11, largest odd <= min(H, W)) (7 for 8 x 8), and the
result is scikit-image's with that `win_size`: scikit-image keeps the Gaussian filter itself
(sigma 1.5, truncated at 3.5 sigma: 11 taps, boundary mode 'reflect') and only crops
(win_size - 1) / 2 pixels, so near the crop the filter sees mirrored pixels. Images smaller
than 3 x 3 are rejected.
"""

import jax
import jax.numpy as jnp
import numpy as np

SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
SSIM_WIN_SIZE = 11
TRUNCATE = 3.5  # scikit-image's (and scipy.ndimage's gaussian_filter's) truncation: radius int(3.5 * 1.5 + 0.5) = 5


def _check_pair(x: jax.Array, y: jax.Array) -> None:
    if x.ndim != 4:
        raise ValueError(f"x: expected images [B, H, W, C], got shape {x.shape}")
    if x.shape != y.shape:
        raise ValueError(f"y: expected the shape of x {x.shape}, got {y.shape}")


def psnr(x: jax.Array, y: jax.Array, data_range: float = 2.0) -> jax.Array:
    """Peak signal-to-noise ratio in dB per image: 10 log10(data_range^2 / MSE) -> [B].

    MSE over all pixels and channels of an image. Identical images give +inf (MSE 0), as
    scikit-image's `peak_signal_noise_ratio`; average finite values or cap them when logging.
    """
    _check_pair(x, y)
    mse = jnp.mean(jnp.square(x.astype(jnp.float32) - y.astype(jnp.float32)), axis=(1, 2, 3))  # [B]
    return 10.0 * jnp.log10(data_range**2 / mse)


def ssim_win_size(height: int, width: int) -> int:
    """The SSIM window: 11, or for smaller images the largest odd size <= min(height, width).

    Raises:
        ValueError: when an image side is below 3.
    """
    side = min(height, width)
    if side < 3:
        raise ValueError(f"x: SSIM needs images of at least 3x3, got {height}x{width}")
    return min(SSIM_WIN_SIZE, side if side % 2 else side - 1)


def gaussian_taps(sigma: float = SSIM_SIGMA, truncate: float = TRUNCATE) -> np.ndarray:
    """The normalised 1-D Gaussian exp(-i^2 / (2 sigma^2)), i = -r..r, r = int(truncate * sigma + 0.5).

    scipy.ndimage's kernel (11 taps for sigma 1.5); the 2-D window is its outer product, Wang
    et al.'s w_i with sum 1.
    """
    radius = int(truncate * sigma + 0.5)
    i = np.arange(-radius, radius + 1, dtype=np.float64)
    taps = np.exp(-0.5 * (i / sigma) ** 2)
    return taps / taps.sum()


def _filter_matrix(n: int, win_size: int, sigma: float) -> np.ndarray:
    """The 1-D Gaussian filter with 'reflect' boundary, cropped by (win_size - 1) // 2, as a matrix [n - 2 pad, n].

    Row o filters around pixel o + pad; taps beyond the edge read the mirrored pixel
    (scipy.ndimage 'reflect', d c b a | a b c d | d c b a, period 2n).
    """
    taps = gaussian_taps(sigma)
    radius = len(taps) // 2
    pad = (win_size - 1) // 2
    out = np.zeros((n - 2 * pad, n), np.float64)
    for o in range(n - 2 * pad):
        for k, tap in enumerate(taps):
            j = (o + pad + k - radius) % (2 * n)
            out[o, j if j < n else 2 * n - 1 - j] += tap
    return out


def ssim(
    x: jax.Array,
    y: jax.Array,
    data_range: float = 2.0,
    *,
    win_size: int | None = None,
    sigma: float = SSIM_SIGMA,
    k1: float = SSIM_K1,
    k2: float = SSIM_K2,
) -> jax.Array:
    """Mean structural similarity per image (Wang et al. 2004, eq. (13), Gaussian window) -> [B].

    See the module docstring: scikit-image's `structural_similarity` with gaussian_weights=True,
    use_sample_covariance=False, channels averaged. SSIM(x, x) = 1.

    Args:
        x, y: images [B, H, W, C].
        data_range: the dynamic range L of the pixel values (2 for [-1, 1]).
        win_size: odd crop window; None for `ssim_win_size(H, W)` (11 unless the image is smaller).
        sigma, k1, k2: Wang et al.'s Gaussian width and stabilising constants.

    Raises:
        ValueError: for mismatched shapes, images smaller than 3x3, or a win_size that is even,
            below 3 or larger than the image.
    """
    _check_pair(x, y)
    h, w = x.shape[1], x.shape[2]
    if win_size is None:
        win_size = ssim_win_size(h, w)
    elif win_size < 3 or win_size % 2 == 0 or win_size > min(h, w):
        raise ValueError(f"win_size: must be odd, >= 3 and at most the image side {min(h, w)}, got {win_size}")
    fh = jnp.asarray(_filter_matrix(h, win_size, sigma), jnp.float32)  # [h', H]
    fw = jnp.asarray(_filter_matrix(w, win_size, sigma), jnp.float32)  # [w', W]

    def filt(a: jax.Array) -> jax.Array:
        return jnp.einsum("ph,bhwc,qw->bpqc", fh, a, fw, precision=jax.lax.Precision.HIGHEST)  # [B, h', w', C]

    x = x.astype(jnp.float32)
    y = y.astype(jnp.float32)
    mu_x, mu_y = filt(x), filt(y)
    var_x = filt(x * x) - mu_x * mu_x
    var_y = filt(y * y) - mu_y * mu_y
    cov_xy = filt(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    ssim_map = ((2.0 * mu_x * mu_y + c1) * (2.0 * cov_xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return jnp.mean(ssim_map, axis=(1, 2, 3))  # over positions, then (equal counts) channels
