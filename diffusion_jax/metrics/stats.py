"""Sample-quality statistics on feature vectors: Fréchet distance (FID), Inception Score and KID.

They take features or logits as float arrays on the host (NumPy, float64 inside), so the same
functions serve the Inception network (`metrics.inception`) and the digits classifier
(`metrics.digits`). Reference statistics are stored as `.npz` with `mu` [D] and `sigma` [D, D],
the layout of pytorch-fid and the ADM evaluator's reference batches.
"""

from pathlib import Path
from typing import NamedTuple

import numpy as np
from scipy import special


class FeatureStats(NamedTuple):
    """The mean [D] and covariance [D, D] of a set of feature vectors, and how many there were."""

    mu: np.ndarray
    sigma: np.ndarray
    num: int


def feature_stats(features: np.ndarray) -> FeatureStats:
    """Mean and unbiased covariance (N - 1 in the denominator, as numpy.cov) of features [N, D]."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features: need an [N, D] array with N >= 2, got shape {features.shape}")
    return FeatureStats(features.mean(axis=0), np.cov(features, rowvar=False), features.shape[0])


def save_stats(path: str | Path, stats: FeatureStats, **protocol: object) -> None:
    """Writes `mu`, `sigma`, `num` and any protocol fields (strings or numbers) to an .npz."""
    np.savez(path, mu=stats.mu, sigma=stats.sigma, num=stats.num, **{k: np.asarray(v) for k, v in protocol.items()})


def load_stats(path: str | Path) -> FeatureStats:
    """Reads an .npz with `mu` [D] and `sigma` [D, D] (ours, pytorch-fid's or ADM's)."""
    with np.load(path) as f:
        if "mu" not in f or "sigma" not in f:
            raise ValueError(f"{path}: reference statistics need arrays 'mu' and 'sigma'; it has {sorted(f.files)}")
        num = int(f["num"]) if "num" in f else 0
        return FeatureStats(np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64), num)


def _sqrtm_psd(matrix: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric positive semi-definite matrix (eigenvalues < 0 -> 0)."""
    eigvals, eigvecs = np.linalg.eigh((matrix + matrix.T) / 2)
    return (eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))) @ eigvecs.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """d² = ||mu1 - mu2||² + Tr(S1 + S2 - 2 (S1 S2)^½) (Heusel et al. 2017, Eq. 6; Dowson & Landau 1982).

    Tr (S1 S2)^½ is computed as Tr (S1^½ S2 S1^½)^½, a square root of a symmetric PSD matrix
    by eigendecomposition, which stays real and needs no regularising offset (pytorch-fid's
    `scipy.linalg.sqrtm` of the non-symmetric S1 S2 can return complex parts and needs one).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"frechet_distance: shapes differ: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    root1 = _sqrtm_psd(sigma1)
    eigvals = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
    trace_sqrt = np.sum(np.sqrt(np.clip(eigvals, 0.0, None)))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


def fid_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


def inception_score(logits: np.ndarray, num_splits: int = 10) -> tuple[float, float]:
    """IS = exp E_x KL(p(y|x) || p(y)) (Salimans et al. 2016), mean and std over `num_splits` splits.

    `logits` [N, K]; the class distribution p(y|x) is their softmax (for the FID Inception,
    all 1008 logits, as the original TF implementation). The splits are consecutive blocks,
    as in the reference code (10 splits of 5,000 for 50k samples).
    """
    logits = np.asarray(logits, np.float64)
    if logits.ndim != 2 or logits.shape[0] < num_splits:
        raise ValueError(f"inception_score: need logits [N, K] with N >= num_splits={num_splits}, got {logits.shape}")
    log_p = special.log_softmax(logits, axis=1)
    scores = []
    for part in np.array_split(log_p, num_splits):
        log_marginal = special.logsumexp(part, axis=0) - np.log(len(part))
        kl = np.sum(np.exp(part) * (part - log_marginal), axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def kernel_inception_distance(
    features1: np.ndarray, features2: np.ndarray, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """KID (Bińkowski et al. 2018): the unbiased MMD² with the kernel k(x, y) = (x·y / D + 1)³,
    mean and std over `num_subsets` random subsets of `subset_size` from each set (the
    protocol of their code and of torch-fidelity; the subset size is capped at the smaller set)."""
    x, y = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"kernel_inception_distance: need [N, D] and [M, D] features, got {x.shape}, {y.shape}")
    m = min(subset_size, len(x), len(y))
    if m < 2:
        raise ValueError(f"kernel_inception_distance: need at least 2 features in each set, got {len(x)}, {len(y)}")
    rng = np.random.default_rng(seed)
    dim = x.shape[1]
    values = []
    for _ in range(num_subsets):
        a = x[rng.choice(len(x), m, replace=False)]
        b = y[rng.choice(len(y), m, replace=False)]
        k_aa, k_bb, k_ab = ((a @ a.T / dim + 1) ** 3, (b @ b.T / dim + 1) ** 3, (a @ b.T / dim + 1) ** 3)
        off_diag = (k_aa.sum() - np.trace(k_aa) + k_bb.sum() - np.trace(k_bb)) / (m * (m - 1))
        values.append(off_diag - 2.0 * k_ab.mean())
    return float(np.mean(values)), float(np.std(values))
