"""The explicit-collective train step (`training.step_impl='shard_map'`, `training.shard_step`): the jit step's
gradients and training curve on 1, 2 and 8 devices, its rows PRNG, and the sequence-parallel DiT under both
steps."""

import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import load_config, tiny_digits_config

from diffusion_jax.errors import ConfigError
from diffusion_jax.training import experiment, shard_step
from diffusion_jax.training import mesh as mesh_lib


def run(config, devices, num_steps):
    """(losses and grad norms [num_steps, 2], initial and final params) of the digits batches under config's step."""
    exp = experiment.build(config, devices)
    step = experiment.jit_train_step(exp, config)
    state, curve = exp.init_state(), []
    initial = jax.tree.map(np.asarray, state.params)
    for batch in itertools.islice(experiment.training_batches(exp, config), num_steps):
        state, metrics = step(state, batch)
        curve.append((float(metrics["loss"]), float(metrics["grad_norm"])))
    return np.array(curve), initial, state.params


def swissroll_config():
    """The Swiss roll's MLP, small, with dropout: the cheapest step to compile twice."""
    config = load_config("ddpm_swissroll")
    config.model.update(hidden=32, depth=2, dropout=0.1)
    config.training.update(batch_size=16, ema_decays=(0.9,))
    config.sample.update(ema_decay=0.9, batch_size=8, num_samples=8)
    return config


@pytest.mark.parametrize("data, num_devices, num_steps", [("swissroll", 1, 1), ("swissroll", 2, 1), ("digits", 8, 20)])
def test_shard_map_step_trains_the_jit_steps_run(digits_data_dir, data, num_devices, num_steps):
    """The same gradients, losses and parameters, dropout on: the gradient is averaged once (pmean after grad;
    the trap's 8x gradient fails here), and each device's draws are its rows of the jit step's. On 8 devices,
    the 20-step training curve of the digits config. Adam with eps = 1 updates by about lr·m, so the parameters
    compare the gradients (eps = 1e-8 would make every near-zero gradient's update ±lr, noise amplified)."""
    config = tiny_digits_config(digits_data_dir) if data == "digits" else swissroll_config()
    config.optim.update(learning_rate=0.05, warmup_steps=0, eps=1.0)
    devices = jax.devices()[:num_devices]
    jit_curve, initial, jit_params = run(config, devices, num_steps)
    config.training.step_impl = "shard_map"
    curve, _, params = run(config, devices, num_steps)
    np.testing.assert_allclose(curve, jit_curve, rtol=2e-5)
    moved = max(float(np.abs(np.asarray(a) - b).max()) for a, b in zip(jax.tree.leaves(jit_params),
                                                                       jax.tree.leaves(initial), strict=True))
    assert moved > 1e-3  # the comparison below is of real updates
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(jit_params), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def draws(key):
    k1, k2 = jax.random.split(jax.random.fold_in(key, 3))
    return jax.random.normal(k1, (16, 3)), jax.random.randint(k2, (16,), 0, 1000), jax.random.uniform(k2, ())


@pytest.mark.parametrize("num_shards", [2, 8])
def test_rows_keys_draw_each_shards_rows_of_the_global_draw(num_shards):
    key = jax.random.key(7)
    normal, ints, scalar = draws(key)
    rows = 16 // num_shards
    for shard in range(num_shards):
        k1, k2 = jax.random.split(jax.random.fold_in(shard_step.rows_key(key, shard, num_shards), 3))
        np.testing.assert_array_equal(jax.random.normal(k1, (rows, 3)), normal[shard * rows:(shard + 1) * rows])
        np.testing.assert_array_equal(jax.random.randint(k2, (rows,), 0, 1000), ints[shard * rows:(shard + 1) * rows])
        assert jax.random.uniform(k2, ()) == scalar  # a scalar draw is the same on every device


def test_per_device_streams_differ_between_devices():
    """'per_device': the step's key folded with the device index; no device repeats another's noise."""
    mesh = mesh_lib.make_mesh({"data": 8})

    def per_device(params, state, frozen, images, labels, cond, noise, key):
        return (jnp.zeros(()), {"noise": jax.random.normal(key, (images.shape[0],))}), params

    gather = shard_step.all_reduced(per_device, mesh, rng="per_device")
    images = jax.device_put(jnp.zeros((16, 2)), mesh_lib.batch_sharding(mesh))
    (_, aux), _ = jax.jit(gather)(jnp.zeros(()), None, None, images, images[:, 0], None, None,
                                  jax.random.key(0))
    noise = np.asarray(aux["noise"]).reshape(8, 2)
    assert len({tuple(row) for row in noise}) == 8


def test_step_impl_options_are_checked(digits_data_dir):
    config = tiny_digits_config(digits_data_dir)
    config.training.step_impl = "pmap"
    with pytest.raises(ConfigError, match=r"training.step_impl: got 'pmap'; expected 'jit' or 'shard_map'"):
        experiment.build(config)
    config.training.update(step_impl="shard_map", shard_map_rng="device")
    with pytest.raises(ConfigError, match=r"training.shard_map_rng: got 'device'; expected 'global' or 'per_device'"):
        experiment.build(config)


def dit_config(data_dir):
    config = tiny_digits_config(data_dir)
    config.model = ml_collections.ConfigDict(dict(name="dit", patch_size=2, hidden_size=16, depth=2, num_heads=2))
    config.optim.update(learning_rate=0.05, warmup_steps=0, eps=1.0)  # updates that compare gradients (above)
    config.mesh.update(data=2, sequence=4)
    return config


def test_sequence_parallel_dit_trains_the_single_devices_run(digits_data_dir):
    """mesh.sequence=4 (x data=2): the DiT's 16 tokens split over 4 devices, its attention a ring; the step trains
    what one device trains, and the compiled step passes K/V round the ring."""
    config = dit_config(digits_data_dir)
    exp = experiment.build(config)
    step = experiment.jit_train_step(exp, config)
    state = exp.init_state()
    batch = next(experiment.training_batches(exp, config))
    assert "collective-permute" in step.lower(state, batch).compile().as_text()
    one_curve, _, one_params = run(changed_mesh(config, data=1, sequence=1), jax.devices()[:1], 2)
    curve, _, params = run(config, jax.devices(), 2)
    np.testing.assert_allclose(curve, one_curve, rtol=2e-5)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(one_params), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    config.training.step_impl = "shard_map"  # XLA cannot nest the ring's shard_map in the step's: one line
    with pytest.raises(ConfigError, match=r"training.step_impl: 'shard_map' cannot nest the ring attention of "
                                          r"mesh.sequence=4; use 'jit'"):
        experiment.jit_train_step(exp, config)


def changed_mesh(config, **sizes):
    config = config.copy_and_resolve_references()
    config.mesh.update(sizes)
    return config


def test_the_tokens_live_split_over_the_sequence_axis():
    from diffusion_jax.models import ring_attention

    mesh = mesh_lib.make_mesh({"data": 2, "sequence": 4})
    tokens = jax.device_put(jnp.zeros((4, 16, 8)), mesh_lib.batch_sharding(mesh))
    out = jax.jit(mesh_lib.with_mesh(lambda x: ring_attention.shard_tokens(x) + 1, mesh))(tokens)
    assert out.sharding.shard_shape(out.shape) == (2, 4, 8)  # batch over data, tokens over sequence


COLLECTIVES = ("all-reduce", "all-gather", "collective-permute", "all-to-all", "reduce-scatter")


def test_sampling_runs_without_collectives_and_draws_the_same_samples_on_1_and_8_devices(digits_data_dir):
    """The sample function on a batch split over all 8 devices: its compiled chain holds no collective (each
    device samples its own examples), and it returns what one device returns for the same seed."""
    config = tiny_digits_config(digits_data_dir)
    samples = {}
    for num_devices in (1, 8):
        exp = experiment.build(config, jax.devices()[:num_devices])
        params, key = exp.init_state().params, jax.random.key(3)
        if num_devices == 8:
            hlo = exp.sample_fn.lower(params, key).compile().as_text()
            assert not [c for c in COLLECTIVES if c in hlo]
        samples[num_devices] = np.asarray(exp.sample_fn(params, key)[0])
    assert samples[8].std() > 0.1
    np.testing.assert_allclose(samples[8], samples[1], atol=1e-5)


def test_a_dit_whose_tokens_do_not_divide_the_sequence_axis_matches_one_device():
    """9 tokens (6x6, patch 2) on sequence 4: the ring pads to 12 and masks the pad keys; the forward pass and the
    gradients equal one device's (random weights, so every block's attention contributes)."""
    from flax import nnx

    from diffusion_jax.models.dit import DiT

    graphdef, params = nnx.split(DiT(image_size=6, in_channels=1, patch_size=2, hidden_size=16, depth=2,
                                     num_heads=2, rngs=nnx.Rngs(0)))
    leaves, tree = jax.tree.flatten(params)
    params = jax.tree.unflatten(tree, [x + 0.3 * jax.random.normal(jax.random.key(i), x.shape)
                                       for i, x in enumerate(leaves)])
    x, t = jax.random.normal(jax.random.key(1), (4, 6, 6, 1)), jnp.arange(4.0)

    def loss(params, x, t):
        out = nnx.merge(graphdef, params)(x, t)
        return jnp.mean(out**2), out

    (one_loss, one_out), one_grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, x, t)
    mesh = mesh_lib.make_mesh({"data": 2, "sequence": 4})
    on_mesh = [jax.device_put(a, mesh_lib.batch_sharding(mesh)) for a in (x, t)]
    (ring_loss, ring_out), ring_grads = jax.jit(mesh_lib.with_mesh(jax.value_and_grad(loss, has_aux=True), mesh))(
        jax.device_put(params, mesh_lib.replicated(mesh)), *on_mesh)
    # fp32 rounding of the online softmax, amplified by the random weights' large logits: ~1e-5 relative. An
    # attended pad key or a dropped query would be off by O(0.1).
    np.testing.assert_allclose(ring_out, one_out, rtol=2e-4, atol=1e-5)
    for a, b in zip(jax.tree.leaves(ring_grads), jax.tree.leaves(one_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-4)
