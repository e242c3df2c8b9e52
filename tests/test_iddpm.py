"""Improved DDPM end to end: learned-variance training with L_hybrid and with importance-sampled L_vlb,
resuming the timestep history, and ancestral sampling with the learned variance."""

import json

import jax
import numpy as np
import pytest
from conftest import tiny_digits_config

from diffusion_jax.errors import ConfigError
from diffusion_jax.training import experiment
from diffusion_jax.training.checkpoint import Checkpointer
from diffusion_jax.training.loop import train
from diffusion_jax.training.setup import network_output_fn, sampler_from_config


def iddpm_config(data_dir, **diffusion):
    config = tiny_digits_config(data_dir)
    config.model.learn_sigma = True
    config.diffusion.update(schedule="cosine", **diffusion)
    config.sample.update(sampler="ddpm", steps=5)
    return config


def test_hybrid_training_learns_the_variance_and_samples_with_it(digits_data_dir, tmp_path):
    config = iddpm_config(digits_data_dir, loss="hybrid")
    state = train(config, tmp_path)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(line["vlb_term"]) and line["vlb_term"] > 0 for line in lines)
    samples = np.load(tmp_path / "samples" / "samples_4.npz")["arr_0"]
    assert samples.shape == (8, 8, 8, 1)
    # The variance head received gradients: its output layer moved from its initial value.
    initial = experiment.build(config).init_state().params
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), state.params, initial)
    assert max(jax.tree.leaves(moved)) > 0


def test_learned_variance_is_the_ddpm_default_and_other_samplers_get_the_prediction(digits_data_dir):
    config = iddpm_config(digits_data_dir, loss="hybrid")
    _, options = sampler_from_config(config.sample, learn_sigma=True)
    assert options["variance"] == "learned_range"
    out = np.arange(8.0).reshape(1, 1, 2, 4)  # [prediction (2 channels), v (2 channels)]
    np.testing.assert_array_equal(network_output_fn(True, options)(out), out)
    config.sample.update(sampler="ddim", variance=None)
    _, options = sampler_from_config(config.sample, learn_sigma=True)
    np.testing.assert_array_equal(network_output_fn(True, options)(out), out[..., :2])


def test_importance_sampled_vlb_fills_and_resumes_the_timestep_history(digits_data_dir, tmp_path):
    config = iddpm_config(digits_data_dir, loss="vlb", timestep_sampling="importance", num_timesteps=4)
    config.training.update(num_steps=6, checkpoint_every=3, sample_every=0, log_every=3)
    config.sample.steps = 4
    state = train(config, tmp_path)
    history = state.timestep_history
    np.testing.assert_array_equal(history.counts, [10, 10, 10, 10])  # 96 draws of t over 4 steps
    assert np.all(np.asarray(history.losses) > 0)
    exp = experiment.build(config)
    checkpointer = Checkpointer(tmp_path / "checkpoints")
    restored = checkpointer.restore(exp.abstract_state)
    checkpointer.close()
    np.testing.assert_array_equal(restored.timestep_history.losses, history.losses)


@pytest.mark.parametrize(
    ("model", "diffusion", "sample", "match"),
    [
        ({"learn_sigma": True}, {}, {}, "model.learn_sigma: L_simple does not train the variance"),
        ({}, {"loss": "hybrid"}, {}, "diffusion.loss: 'hybrid'"),
        ({}, {}, {"variance": "learned_range"}, "sample.variance: 'learned_range' needs"),
        ({"learn_sigma": True}, {"loss": "hybrid", "timestep_sampling": "importance"}, {}, "timestep_sampling"),
    ],
)
def test_inconsistent_improved_ddpm_fields_are_config_errors(digits_data_dir, model, diffusion, sample, match):
    config = tiny_digits_config(digits_data_dir)
    config.model.update(model)
    config.diffusion.update(diffusion)
    config.sample.update(sample)
    with pytest.raises(ConfigError, match=match):
        experiment.build(config)
