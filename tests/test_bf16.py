"""bf16 compute (`model.dtype='bfloat16'`, float32 parameters, loss and sampler) trains to fp32's quality."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config, nearest_distance, swissroll_config

from diffusion_jax.data import toy
from diffusion_jax.metrics import digits
from diffusion_jax.training import experiment
from diffusion_jax.training.loop import train
from diffusion_jax.training.sampling import generate


def test_bf16_computes_in_bf16_and_keeps_float32_parameters_and_outputs():
    config = swissroll_config()
    config.model.dtype = "bfloat16"
    exp = experiment.build(config)
    state = exp.init_state()
    assert {leaf.dtype for leaf in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
    assert {leaf.dtype for leaf in jax.tree.leaves(state.opt_state) if leaf.ndim} == {jnp.dtype(jnp.float32)}
    step = experiment.jit_train_step(exp, config)
    size = config.training.batch_size
    batch = {"image": jnp.ones((size, 2)), "label": jnp.zeros(size, jnp.int32)}
    hlo = step.lower(state, jax.device_put(batch, exp.batch_sharding)).as_text()
    assert "bf16" in hlo  # the network's matmuls run in bf16 ...
    new_state, metrics = step(state, jax.device_put(batch, exp.batch_sharding))
    assert metrics["loss"].dtype == jnp.float32  # ... the loss and the update in float32
    samples, _ = exp.sample_fn(new_state.params, jax.random.key(0))
    assert samples.dtype == jnp.float32


@pytest.mark.slow
def test_bf16_swissroll_lands_on_the_roll_like_fp32(tmp_path):
    """The fast suite's fp32 Swiss-roll test (test_training.py), in bf16, with its thresholds."""
    config = swissroll_config()
    config.model.dtype = "bfloat16"
    config.training.update(num_steps=1500, log_every=100, checkpoint_every=1500, sample_every=1500)
    config.sample.update(num_samples=512, batch_size=512)
    train(config, tmp_path)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert np.mean(losses[-3:]) < 0.8 * losses[0]
    trained = np.load(tmp_path / "samples" / "samples_1500.npz")["arr_0"]
    distance = np.median(nearest_distance(trained, toy.swiss_roll(np.random.default_rng(123), 4000)))
    assert distance < 0.15, distance


@pytest.mark.slow
def test_bf16_digits_train_to_the_fp32_quality_band(tmp_path, digits_data_dir):
    """configs/ddpm_digits.py at 8x8 and 400 steps, in fp32 and in bf16: the late losses within 5% and the
    digits-FID of 256 DDIM-25 samples within 30% (+2) of each other."""
    results = {}
    for dtype in ("float32", "bfloat16"):
        config = load_config("ddpm_digits")
        config.data.update(image_size=8, data_dir=digits_data_dir)
        config.model.update(ch_mult=(1, 2), attn_resolutions=(4,), dtype=dtype)
        config.training.update(num_steps=400, checkpoint_every=400, sample_every=0, log_every=50)
        config.sample.update(sampler="ddim", steps=25, num_samples=256, batch_size=256, eta=0.0)
        state = train(config, tmp_path / dtype)
        lines = (tmp_path / dtype / "metrics.jsonl").read_text().splitlines()
        late_loss = np.mean([json.loads(line)["loss"] for line in lines[-4:]])
        exp = experiment.build(config)
        samples, _ = generate(exp.sample_fn, experiment.sampling_params(config, state), jax.random.key(0), 256)
        results[dtype] = (late_loss, digits.digits_fid(samples))
        print(f"{dtype}: late loss {late_loss:.4f}, digits-FID {results[dtype][1]:.2f} (N = 256)")
    (loss32, fid32), (loss16, fid16) = results["float32"], results["bfloat16"]
    assert abs(loss16 - loss32) < 0.05 * loss32, results
    assert fid16 < 1.3 * fid32 + 2.0 and fid32 < 1.3 * fid16 + 2.0, results
    assert fid32 < 150, results  # both learnt digits: 92 here after 400 steps; Gaussian noise scores about 340
