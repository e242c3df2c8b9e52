"""Sample-quality metrics.

- `stats`: Fréchet distance, Inception Score, KID and feature statistics (.npz), on any features;
- `inception`: the FID Inception-v3 (pytorch-fid's port) and its torch-free weight loader;
- `fid`: Inception features of whole image sets and reference statistics;
- `digits`: the offline digits metric (digits-FID, an IS analogue, class accuracy) from a shipped classifier;
- `image_quality`: PSNR and SSIM of reconstructions.

`inception` and `fid` build a 24M-parameter network only when used; importing them is cheap.
"""

from diffusion_jax.metrics import digits, fid, image_quality, inception, stats

__all__ = ["digits", "fid", "image_quality", "inception", "stats"]
