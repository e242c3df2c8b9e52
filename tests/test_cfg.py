"""Classifier-free guidance's training half (label dropout) and its channel option."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config, tiny_digits_config

import diffusion_jax as dj
from diffusion_jax import conditioning, guidance, objectives
from diffusion_jax.metrics import digits
from diffusion_jax.training import experiment, optimizer
from diffusion_jax.training import state as state_lib
from diffusion_jax.training import step as step_lib
from diffusion_jax.training.loop import train
from diffusion_jax.training.sampling import generate, sample_labels
from diffusion_jax.training.setup import build_model, build_process

NUM_STEPS = 800  # the slow test's training length


def test_label_dropout_yields_the_null_class_at_its_rate():
    labels = jnp.arange(200_000, dtype=jnp.int32) % 10
    dropped = np.asarray(conditioning.drop(jax.random.key(0), labels, 0.1, 10))
    null = dropped == 10
    assert abs(null.mean() - 0.1) < 0.003  # 4.5 standard deviations at n = 200k
    np.testing.assert_array_equal(dropped[~null], np.asarray(labels)[~null])
    assert np.all(np.asarray(conditioning.drop(jax.random.key(1), labels, 0.0, 10)) == np.asarray(labels))


def test_the_train_step_feeds_the_network_null_labels_at_training_label_dropout(digits_data_dir, monkeypatch):
    config = tiny_digits_config(digits_data_dir)
    config.model.num_classes = 10
    config.training.update(batch_size=4096, label_dropout=0.25)
    seen = []

    def recording_apply(graphdef, params, x, t, cond=None, **kwargs):
        jax.debug.callback(lambda c: seen.append(np.asarray(c)), cond)
        return x * params["conv_in"]["kernel"].sum()  # a network that depends on its parameters

    monkeypatch.setattr(objectives, "model_apply", recording_apply)
    graphdef, init = build_model(config, (8, 8, 1))
    tx = optimizer.make_optimizer(config.optim, 4)
    state = state_lib.create(init(jax.random.key(0)), tx, len(config.training.ema_decays), jax.random.key(1))
    objective = objectives.build(config, graphdef, build_process(config), (8, 8, 1))
    train_step = jax.jit(step_lib.make_train_step(graphdef, objective, tx, lambda s: 1e-3, config))
    labels = jnp.arange(4096, dtype=jnp.int32) % 10
    batch = {"image": jnp.zeros((4096, 8, 8, 1)), "label": labels}
    jax.block_until_ready(train_step(state, batch))
    cond = np.concatenate(seen)
    assert abs(np.mean(cond == 10) - 0.25) < 0.03
    np.testing.assert_array_equal(cond[cond != 10], np.asarray(labels)[cond != 10])


def test_guidance_of_the_first_channels_keeps_the_rest_conditional():
    def model_fn(x, t, cond):  # conditional: 2 everywhere; unconditional (null = 10): 1 everywhere
        return jnp.where((cond == 10)[:, None, None, None], 1.0, 2.0) * jnp.ones((x.shape[0], 2, 2, 8))

    x, t, labels = jnp.zeros((3, 2, 2, 4)), jnp.zeros((3,), jnp.int32), jnp.arange(3)
    full = guidance.classifier_free(model_fn, labels, 10, 1.5)(x, t)
    np.testing.assert_allclose(full, 2.0 + 1.5 * (2.0 - 1.0))
    first3 = guidance.classifier_free(model_fn, labels, 10, 1.5, channels=3)(x, t)
    np.testing.assert_allclose(first3[..., :3], 3.5)
    np.testing.assert_allclose(first3[..., 3:], 2.0)  # DiT's 4th latent channel and the variance: conditional


@pytest.mark.slow
def test_guided_digits_are_of_the_requested_class(digits_data_dir, tmp_path):
    """configs/cfg_digits.py at 8x8, shortened: the digits classifier finds the requested class far above
    chance (0.1), and more often with guidance (s = 3) than without (s = 1, the conditional model)."""
    config = load_config("cfg_digits")
    config.data.update(image_size=8, data_dir=digits_data_dir)
    config.model.update(ch_mult=(1, 2), attn_resolutions=(4,))
    config.training.update(num_steps=NUM_STEPS, checkpoint_every=NUM_STEPS, sample_every=0, log_every=200)
    config.sample.update(num_samples=200, batch_size=200, steps=25)
    state = train(config, tmp_path)
    labels = sample_labels(200, 10, 200)
    accuracy = {}
    for scale in (1.0, 3.0):
        config.sample.guidance_scale = scale
        exp = experiment.build(config)
        samples, _ = generate(exp.sample_fn, experiment.sampling_params(config, state), jax.random.key(0), 200)
        accuracy[scale] = digits.class_accuracy(samples, labels)
    # The notebook's way: the loaded model's `sample` labels (0, 1, 2, ... cycling) and guides as sample mode does.
    guided = dj.load(tmp_path).sample(jax.random.key(1), 200, guidance_scale=3.0)
    accuracy["dj.load"] = digits.class_accuracy(np.asarray(guided), labels)
    assert accuracy[1.0] > 0.3, accuracy
    assert accuracy[3.0] > accuracy[1.0] and accuracy[3.0] > 0.6, accuracy
    assert accuracy["dj.load"] > 0.6, accuracy
