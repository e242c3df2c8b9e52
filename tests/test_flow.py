"""Flow matching and rectified flow: the process's (α, σ) view, the loss's minimiser on an exact Gaussian
mixture, straightness, Euler = DDIM on the flow, and a flow run followed by reflow on its pairs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_build_errors, changed, tiny_digits_config

import diffusion_jax as dj
from diffusion_jax import diffusion, exact, flow, reflow, sde
from diffusion_jax.errors import ConfigError
from diffusion_jax.training import experiment
from diffusion_jax.training.loop import train


def test_the_flow_process_is_the_linear_interpolant():
    process = sde.Flow()
    t = np.asarray([0.01, 0.3, 0.5, 0.9])
    alpha, sigma = process.alpha_sigma(t)
    np.testing.assert_allclose(alpha + sigma, 1.0)
    np.testing.assert_allclose(process.time_at_log_snr(process.log_snr(t)), t, rtol=1e-12)
    x0, eps = np.random.default_rng(0).standard_normal((2, 4, 3))
    x_t = (1 - t)[:, None] * x0 + t[:, None] * eps
    pred = diffusion.to_x0_eps(eps - x0, x_t, alpha[:, None], sigma[:, None], "velocity")
    np.testing.assert_allclose(pred.x0, x0, atol=1e-12)
    np.testing.assert_allclose(pred.eps, eps, atol=1e-12)
    np.testing.assert_allclose(process.sampling_times(2, "trailing"), [0.5, 0.999], atol=1e-3)


def test_the_loss_is_minimised_by_the_exact_velocity():
    mixture = exact.ring(4, std=0.1)
    u = exact.velocity_model(mixture, sde.Flow())
    x0 = jnp.asarray(mixture.sample(np.random.default_rng(0), 16384), jnp.float32)
    key = jax.random.key(1)

    def loss(scale: jax.Array, shift: jax.Array) -> jax.Array:
        return flow.flow_matching_loss(lambda x, t: u(x, t) * (1.0 + scale) + shift, x0, key)[0]

    at_exact = loss(0.0, jnp.zeros(2))
    for scale, shift in [(0.05, (0.0, 0.0)), (-0.05, (0.0, 0.0)), (0.0, (0.05, 0.0)), (0.0, (0.0, -0.05))]:
        assert loss(scale, jnp.asarray(shift)) > at_exact
    grad_scale, grad_shift = jax.grad(loss, argnums=(0, 1))(0.0, jnp.zeros(2))
    curvature = jax.grad(jax.grad(lambda a: loss(a, jnp.zeros(2))))(0.0)
    assert abs(float(grad_scale)) < 0.02 * float(curvature)
    assert float(jnp.max(jnp.abs(grad_shift))) < 0.02 * 2.0  # the shift's curvature is 2 (the loss's 1/D . 2D)
    t = flow.sample_times(jax.random.key(2), 100_000)
    logits = np.log(t) - np.log1p(-t)
    np.testing.assert_allclose([logits.mean(), logits.std()], [0.0, 1.0], atol=0.02)
    with pytest.raises(ConfigError, match="^flow.t_sampling: unknown 'beta'"):
        flow.sample_times(jax.random.key(2), 4, "beta")


def test_euler_on_the_flow_draws_the_mixture_and_measures_straightness():
    mixture = exact.ring(8, std=0.05)
    process = sde.Flow()
    x_T = jax.random.normal(jax.random.key(0), (4000, 2))
    sample = dj.samplers.get("ddim")
    x0, info = sample(exact.velocity_model(mixture, process), process, jax.random.key(1), x_T, steps=100,
                      prediction="velocity", spacing="trailing", clip_x0=None, return_trajectory=True)
    trajectory = info.trajectory  # [101, B, 2]: x_T first
    reference = mixture.sample(np.random.default_rng(1), 4000)
    assert exact.sliced_wasserstein(np.asarray(x0), reference) < 0.05
    times = jnp.concatenate([jnp.asarray(process.sampling_times(100, "trailing"))[::-1], jnp.zeros(1)])
    bent = float(jnp.mean(flow.straightness(trajectory, times)))
    straight_line = x_T[None] + (x0 - x_T)[None] * (1 - times)[:, None, None]
    assert float(jnp.max(flow.straightness(straight_line, times))) < 1e-8 < bent


def rf_config(data_dir: str):
    config = tiny_digits_config(data_dir)
    config.training.update(objective="flow_matching", num_steps=2, checkpoint_every=2, sample_every=2)
    config.diffusion.update(process="flow", prediction="velocity")
    config.sample.update(sampler="ddim", steps=2, spacing="trailing", clip_x0=None)
    config.eval.metrics = ("digits",)
    return config


def test_a_flow_trains_and_reflow_retrains_it_on_its_own_pairs(digits_data_dir, tmp_path):
    first = train(rf_config(digits_data_dir), tmp_path / "rf")
    assert (tmp_path / "rf" / "samples" / "samples_2.png").exists()
    pairs_dir = reflow.write_pairs(tmp_path / "rf", tmp_path / "pairs", 20, sampler="ddim", steps=2, batch_size=16)
    pairs = reflow.open_pairs(pairs_dir, (8, 8, 1))
    model = dj.load(tmp_path / "rf")
    again = dj.samplers.get("ddim")(model.model_fn(), model.schedule, jax.random.key(0),
                                    jnp.asarray(pairs["noise"][:4]), steps=2, prediction="velocity")
    np.testing.assert_allclose(again, pairs["image"][:4], atol=1e-5)  # each sample is its noise's ODE image

    config = rf_config(digits_data_dir)
    config.flow.update(pairs_dir=str(pairs_dir), init_workdir=str(tmp_path / "rf"))
    exp = experiment.build(config)
    start = exp.init_state()
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, start.params, model.params)))  # the 1-flow's EMA
    config.training.sample_every = 0
    second = train(config, tmp_path / "rf2")
    assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, second.params, first.params)))

    assert_build_errors([
        (changed(config, {"flow.pairs_dir": str(tmp_path / "nowhere")}),
         r"^flow.pairs_dir: .*nowhere holds no reflow pairs"),
        (changed(rf_config(digits_data_dir), {"diffusion.prediction": "eps"}),
         r"^diffusion.prediction: 'eps' on diffusion.process='flow'"),
        (changed(rf_config(digits_data_dir), {"diffusion.process": "discrete"}),
         r"^diffusion.prediction: 'velocity' on diffusion.process='discrete'"),
    ])
