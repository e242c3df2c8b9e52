"""Sample-quality metrics: feature statistics (FID, IS, KID), the FID Inception network and the
offline digits classifier."""

from diffusion_jax.metrics import stats

__all__ = ["stats"]
