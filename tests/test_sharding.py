"""Meshes from the config: DP, FSDP and DP x FSDP train like one device; FSDP really shards; checkpoints
move between meshes; gradient accumulation is the full-batch gradient."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_digits_config
from jax.sharding import PartitionSpec

from diffusion_jax import diffusion
from diffusion_jax.errors import ConfigError
from diffusion_jax.training import experiment
from diffusion_jax.training import mesh as mesh_lib
from diffusion_jax.training.checkpoint import Checkpointer
from diffusion_jax.training.loop import train

MESHES = {  # name: (data, fsdp)
    "dp8": (8, 1),
    "fsdp8": (1, 8),
    "dp2_fsdp4": (2, 4),
}


def sharded_config(digits_data_dir, data=-1, fsdp=1):
    config = tiny_digits_config(digits_data_dir)
    config.model.dropout = 0.0
    config.mesh.update(data=data, fsdp=fsdp, fsdp_min_size=0)
    return config


def run_steps(config, devices, batches):
    exp = experiment.build(config, devices)
    step = experiment.jit_train_step(exp, config)
    state, losses = exp.init_state(), []
    for batch in batches:
        state, metrics = step(state, jax.device_put(batch, exp.batch_sharding))
        losses.append((float(metrics["loss"]), float(metrics["grad_norm"])))
    return state, np.array(losses)


def random_batches(n=3, batch_size=16):
    rng = np.random.default_rng(0)
    return [
        {"image": rng.uniform(-1, 1, (batch_size, 8, 8, 1)).astype(np.float32),
         "label": rng.integers(0, 10, batch_size).astype(np.int32)}
        for _ in range(n)
    ]


def test_mesh_shape_resolves_the_free_axis_and_names_bad_sizes():
    assert mesh_lib.mesh_shape({"data": -1, "fsdp": 2}, 8) == {"data": 4, "fsdp": 2, "sequence": 1, "tensor": 1}
    assert mesh_lib.mesh_shape({"data": 2, "fsdp": -1, "tensor": 2}, 8) == {"data": 2, "fsdp": 2, "sequence": 1,
                                                                             "tensor": 2}
    assert mesh_lib.mesh_shape({"data": 2, "sequence": -1}, 8) == {"data": 2, "fsdp": 1, "sequence": 4, "tensor": 1}
    with pytest.raises(ConfigError, match=r"mesh.data and mesh.fsdp are both -1"):
        mesh_lib.mesh_shape({"data": -1, "fsdp": -1}, 8)
    with pytest.raises(ConfigError, match=r"need a multiple of 3 devices; there are 8"):
        mesh_lib.mesh_shape({"data": -1, "fsdp": 3}, 8)
    with pytest.raises(ConfigError, match=r"mesh.fsdp: got 0; expected a positive int, or -1"):
        mesh_lib.mesh_shape({"data": -1, "fsdp": 0}, 8)
    with pytest.raises(ConfigError, match=r"data=2, fsdp=2, sequence=1, tensor=1 is 4 devices; there are 8"):
        mesh_lib.mesh_shape({"data": 2, "fsdp": 2}, 8)


def test_param_rules_place_each_parameter_by_its_first_matching_rule():
    mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    params = {
        "attn": {"qkv": {"kernel": jax.ShapeDtypeStruct((64, 192), jnp.float32)}},
        "conv": {"kernel": jax.ShapeDtypeStruct((3, 3, 16, 32), jnp.float32),
                 "bias": jax.ShapeDtypeStruct((32,), jnp.float32)},
        "odd": jax.ShapeDtypeStruct((3, 5), jnp.float32),
        "norm": {"scale": jax.ShapeDtypeStruct((64,), jnp.float32)},
    }
    rules = ((r"attn/.*kernel", (None, "tensor")), (r"norm/.*", "replicate"), (r".*", "fsdp"))
    specs = mesh_lib.param_specs(params, mesh, rules, fsdp_min_size=64)
    assert specs["attn"]["qkv"]["kernel"] == PartitionSpec(None, "tensor")
    assert specs["conv"]["kernel"] == PartitionSpec(None, None, None, "fsdp")  # the largest divisible dim
    assert specs["conv"]["bias"] == PartitionSpec()  # 32 elements < fsdp_min_size
    assert specs["odd"] == PartitionSpec()  # no dimension divisible by 4
    assert specs["norm"]["scale"] == PartitionSpec()
    with pytest.raises(ConfigError, match=r"mesh.param_rules\[0\]: placement 'shard'; expected 'replicate', 'fsdp'"):
        mesh_lib.param_specs(params, mesh, (("x", "shard"),))
    with pytest.raises(ConfigError, match=r"mesh.param_rules\[0\]: '\(' is not a regular expression"):
        mesh_lib.param_specs(params, mesh, (("(", "fsdp"),))
    with pytest.raises(ConfigError, match=r"splits dimension 0 of odd \(shape \(3, 5\)\) 2 ways"):
        mesh_lib.param_specs(params, mesh, (("odd", ("tensor",)),))


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_meshes_train_like_one_device(digits_data_dir, mesh_name):
    assert jax.device_count() == 8, "conftest.py simulates 8 CPU devices"
    data, fsdp = MESHES[mesh_name]
    batches = random_batches()
    one, losses_one = run_steps(sharded_config(digits_data_dir), jax.devices()[:1], batches)
    many, losses_many = run_steps(sharded_config(digits_data_dir, data, fsdp), jax.devices(), batches)
    mesh_shape = dict(many.params["conv_in"]["kernel"].sharding.mesh.shape)
    assert mesh_shape == {"data": data, "fsdp": fsdp, "sequence": 1, "tensor": 1}
    np.testing.assert_allclose(losses_many, losses_one, rtol=1e-5)
    # Adam divides by sqrt(v): gradients near zero amplify the different summation order of the
    # shards to ~1e-6, so the tolerance is 1% of one step's size (lr = 1e-3).
    for a, b in zip(jax.tree.leaves(many), jax.tree.leaves(one), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert int(many.step) == 3  # and the parameters moved: a step that did nothing would also match
    assert not np.allclose(many.params["conv_in"]["kernel"], many.ema_params[1]["conv_in"]["kernel"])


def test_fsdp_shards_parameters_emas_and_adam_moments(digits_data_dir):
    exp = experiment.build(sharded_config(digits_data_dir, data=2, fsdp=4))
    state = exp.init_state()
    kernel = state.params["down"][0]["stages"][0]["res"]["conv1"]["kernel"]  # [3, 3, 8, 8]: the last dim splits 4 ways
    assert kernel.shape == (3, 3, 8, 8)
    assert kernel.sharding.spec == PartitionSpec(None, None, None, "fsdp")
    assert {shard.data.shape for shard in kernel.addressable_shards} == {(3, 3, 8, 2)}
    ema = state.ema_params[0]["down"][0]["stages"][0]["res"]["conv1"]["kernel"]
    adam = state.opt_state
    moments = [leaf for leaf in jax.tree.leaves(adam) if leaf.shape == (3, 3, 8, 8)]
    assert moments, "Adam's mu and nu hold a copy of each parameter's shape"
    for array in (ema, *moments):
        assert array.sharding.spec == PartitionSpec(None, None, None, "fsdp")
    per_device = sum(
        np.prod(s.data.shape) for leaf in jax.tree.leaves(state.params) for s in leaf.addressable_shards[:1]
    )
    total = sum(leaf.size for leaf in jax.tree.leaves(state.params))
    assert per_device < total / 3  # most parameters are split 4 ways
    assert state.step.sharding.spec == PartitionSpec()


def test_a_checkpoint_saved_under_fsdp_restores_under_other_meshes(digits_data_dir, tmp_path):
    config = sharded_config(digits_data_dir, data=2, fsdp=4)
    config.training.update(num_steps=2, checkpoint_every=2, sample_every=0, log_every=1)
    saved = train(config, tmp_path)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["images_per_sec"] > 0 and 0 < lines[-1]["mfu"] < 1  # step 1's rate is compile-bound: 0
    for data, fsdp, devices in ((8, 1, jax.devices()), (1, 1, jax.devices()[:1]), (1, 8, jax.devices())):
        exp = experiment.build(sharded_config(digits_data_dir, data, fsdp), devices)
        checkpointer = Checkpointer(tmp_path / "checkpoints")
        restored = checkpointer.restore(exp.abstract_state)
        checkpointer.close()
        for a, b, sharding in zip(
            jax.tree.leaves(restored), jax.tree.leaves(saved), jax.tree.leaves(exp.state_shardings), strict=True
        ):
            assert a.sharding == sharding
            np.testing.assert_array_equal(a, b)


def test_gradient_accumulation_is_the_full_batch_gradient(digits_data_dir, monkeypatch):
    """With a loss that draws nothing at random (the mean squared output), k microbatches of B/k
    give the full batch's gradient; the microbatches are spread over all 8 devices."""

    def deterministic_loss(model_fn, schedule, x0, key, **kwargs):
        t = jnp.full((x0.shape[0],), 10, jnp.int32)
        return jnp.mean(model_fn(x0, t) ** 2), {}

    monkeypatch.setattr(diffusion, "simple_loss", deterministic_loss)
    batches = random_batches(n=2, batch_size=32)
    config = sharded_config(digits_data_dir, fsdp=2)
    config.training.batch_size = 32
    full, losses_full = run_steps(config, jax.devices(), batches)
    config.training.grad_accum_steps = 4
    accumulated, losses_accumulated = run_steps(config, jax.devices(), batches)
    np.testing.assert_allclose(losses_accumulated, losses_full, rtol=1e-5)  # loss and grad_norm: Adam alone
    # would hide a sum in place of a mean (its update is invariant to the gradient's scale)
    for a, b in zip(jax.tree.leaves(accumulated.params), jax.tree.leaves(full.params), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_gradient_accumulation_needs_microbatches_that_split_over_the_devices(digits_data_dir):
    config = sharded_config(digits_data_dir)
    config.training.update(batch_size=16, grad_accum_steps=4)
    with pytest.raises(ConfigError, match=r"training.batch_size: 16 is not divisible by training.grad_accum_steps=4"):
        experiment.build(config)
