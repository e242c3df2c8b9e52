"""MeanFlow (Geng et al. 2025): the JVP target, one-step sampling, training, and the run's wiring."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_build_errors, changed, tiny_digits_config
from flax import nnx

import diffusion_jax as dj
from diffusion_jax import meanflow, models, sde
from diffusion_jax.errors import ConfigError
from diffusion_jax.sample import sample
from diffusion_jax.samplers import meanflow_sample
from diffusion_jax.training.loop import train

DATA_STD = 0.5  # x_0 ~ N(0, s² I): the flow's path z_t has std σ_t = sqrt((1 - t)² s² + t²), and its ODE maps z_t
# to z_r = (σ_r / σ_t) z_t, so the average velocity is u(z, r, t) = z (1 - σ_r / σ_t) / (t - r) in closed form.


def path_std(t: jax.Array) -> jax.Array:
    return jnp.sqrt((1.0 - t) ** 2 * DATA_STD**2 + t**2)


def exact_average_velocity(z: jax.Array, t: jax.Array, r: jax.Array) -> jax.Array:
    gap = t - r
    return z * ((1.0 - path_std(r) / path_std(t)) / gap)[:, None]


def exact_velocity(z: jax.Array, t: jax.Array) -> jax.Array:
    """dz/dt = z σ_t' / σ_t, σ σ' = -(1 - t) s² + t."""
    return z * ((-(1.0 - t) * DATA_STD**2 + t) / path_std(t) ** 2)[:, None]


def test_the_exact_average_velocity_is_its_own_target():
    """The MeanFlow identity u = v - (t - r)(v ∂_z u + ∂_t u) holds for the exact u and v, so the JVP target equals u:
    a wrong tangent (dr = 1, or dz = 0) or sign breaks it by O(1)."""
    keys = jax.random.split(jax.random.key(0), 3)
    z = jax.random.normal(keys[0], (64, 3))
    t = jax.random.uniform(keys[1], (64,), minval=0.1, maxval=0.99)
    r = t * jax.random.uniform(keys[2], (64,), maxval=0.9)  # r < t
    u, target = meanflow.meanflow_target(exact_average_velocity, z, t, r, exact_velocity(z, t))
    np.testing.assert_allclose(target, u, rtol=2e-4, atol=2e-5)
    _, frozen_z = meanflow.meanflow_target(exact_average_velocity, z, t, r, jnp.zeros_like(z))
    assert float(jnp.max(jnp.abs(frozen_z - u))) > 0.1


def test_one_jump_of_the_exact_average_velocity_lands_where_the_ode_does():
    eps = jax.random.normal(jax.random.key(1), (32, 2))
    model_fn = lambda z, times: exact_average_velocity(z, times[:, 0], times[:, 1])  # noqa: E731
    for steps in (1, 3):
        x0, info = meanflow_sample(model_fn, sde.Flow(), jax.random.key(0), eps, steps=steps, return_info=True)
        np.testing.assert_allclose(x0, DATA_STD * eps, rtol=1e-5, atol=1e-5)  # the ODE's image of ε: s ε
        assert int(info.nfe) == steps


def test_meanflow_training_learns_one_step_generation():
    """A small MLP trained on MeanFlow's loss samples N(0, s²) in one jump; one Euler step of the same network's
    instantaneous velocity (r = t, the flow-matching model it also is) collapses towards the mean."""
    model = models.Preconditioned(
        models.create("mlp", in_features=2, hidden=32, depth=2, interval_embedding=True, rngs=nnx.Rngs(0)),
        "meanflow")
    graphdef, params = nnx.split(model)
    tx = optax.adam(optax.cosine_decay_schedule(3e-3, 1000))

    def train_step(carry, key):
        params, opt_state = carry
        data_key, loss_key = jax.random.split(key)
        x0 = DATA_STD * jax.random.normal(data_key, (512, 2))

        def loss(params):
            u = lambda z, t, r: nnx.merge(graphdef, params)(z, meanflow.model_time(t, r))  # noqa: E731
            return meanflow.meanflow_loss(u, x0, loss_key, interval_ratio=0.75, t_sampling="uniform",
                                          adaptive_p=0.0)[0]

        updates, opt_state = tx.update(jax.grad(loss)(params), opt_state)
        return (optax.apply_updates(params, updates), opt_state), None

    train = jax.jit(lambda params: jax.lax.scan(train_step, (params, tx.init(params)),
                                                jax.random.split(jax.random.key(0), 1000))[0][0])
    params = train(params)
    model_fn = lambda z, times: nnx.merge(graphdef, params)(z, times)  # noqa: E731
    eps = jax.random.normal(jax.random.key(7), (2000, 2))
    one_jump = meanflow_sample(model_fn, sde.Flow(), jax.random.key(0), eps, steps=1)
    assert abs(float(jnp.std(one_jump)) - DATA_STD) < 0.1  # measured 0.44
    assert float(jnp.sqrt(jnp.mean(jnp.square(one_jump - DATA_STD * eps)))) < 0.12  # the ODE's coupling (measured 0.07)
    euler = eps - model_fn(eps, jnp.ones((2000,)))  # one Euler step of v(z, 1) ≈ z: lands near 0
    assert float(jnp.std(euler)) < 0.25


def meanflow_config(data_dir: str):
    config = tiny_digits_config(data_dir)
    config.training.update(objective="meanflow", num_steps=2, checkpoint_every=2, sample_every=0)
    config.diffusion.update(process="flow", prediction="velocity")
    config.sample.update(sampler="meanflow", steps=1, clip_x0=None)
    config.eval.metrics = ("digits",)
    return config


def test_a_meanflow_run_trains_samples_in_one_step_and_loads(digits_data_dir, tmp_path):
    config = meanflow_config(digits_data_dir)
    train(config, tmp_path / "mf")
    config.sample.update(steps=2, num_samples=8, batch_size=8)
    png, npz = sample(config, tmp_path / "mf")  # sample mode, two jumps
    images = np.load(npz)["arr_0"]
    assert images.shape == (8, 8, 8, 1) and images.dtype == np.uint8 and png.stat().st_size > 0
    loaded = dj.load(tmp_path / "mf")
    assert "interval" in loaded.params["backbone"]["cond"]  # the interval t - r has its own embedding
    # At r = t the network is the run's flow: the instantaneous velocity u(z, t, t) = v(z, t).
    z, t = jax.random.normal(jax.random.key(1), (4, 8, 8, 1)), jnp.full((4,), 0.7)
    np.testing.assert_allclose(loaded.apply(z, t, None), loaded.apply(z, meanflow.model_time(t, t), None), atol=1e-6)

    flow_matching = changed(meanflow_config(digits_data_dir), {"training.objective": "flow_matching"})
    assert_build_errors([
        (flow_matching, r"^sample.sampler: 'meanflow' jumps with a MeanFlow network's average velocity"),
        (changed(meanflow_config(digits_data_dir), {"diffusion.process": "edm", "diffusion.prediction": "x0",
                                                    "sample.sampler": "heun"}),
         r"^diffusion.process: 'edm'; training.objective='meanflow' trains on 'flow'"),
        (changed(meanflow_config(digits_data_dir), {"meanflow.interval_ratio": 1.5}),
         r"^meanflow.interval_ratio: got 1.5; expected a float in \[0, 1\]"),
    ])


@pytest.mark.parametrize("field,value", [("meanflow.adaptive_p", -1.0), ("meanflow.adaptive_c", 0.0)])
def test_bad_meanflow_options_are_one_line_errors(field, value):
    with pytest.raises(ConfigError, match=rf"^{field}: "):
        meanflow.check_options(**{"interval_ratio": 0.25, "adaptive_p": 1.0, "adaptive_c": 1e-3,
                                  field.split(".")[1]: value})
