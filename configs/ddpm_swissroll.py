"""DDPM on the 2-D Swiss roll (Sohl-Dickstein et al. 2015, Fig. 1) with an MLP denoiser.

    python -m diffusion_jax.main --config=configs/ddpm_swissroll.py --workdir=runs/ddpm_swissroll

Runs in under a minute on a 2-core CPU; samples/samples_<step>.png is a scatter plot.
"""

import ml_collections

from diffusion_jax.config import base_config


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    config.data.name = "swiss_roll"
    config.model = ml_collections.ConfigDict(dict(name="mlp", hidden=128, depth=3, dropout=0.0))
    config.diffusion.schedule = "linear"
    config.diffusion.num_timesteps = 1000
    config.optim.learning_rate = 1e-3
    config.optim.warmup_steps = 100
    config.training.batch_size = 256
    config.training.num_steps = 3000
    config.training.log_every = 500
    config.training.checkpoint_every = 1000
    config.training.sample_every = 3000
    config.training.ema_decays = (0.995,)
    config.sample.ema_decay = 0.995
    config.sample.sampler = "ddpm"
    config.sample.clip_x0 = None
    config.sample.num_samples = 1000
    config.sample.batch_size = 1000
    return config
