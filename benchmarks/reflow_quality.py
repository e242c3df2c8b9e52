"""Reflow straightens a rectified flow: path straightness and few-step Euler quality on the exact ring.

A 1-rectified flow (the `ddpm_swissroll` MLP trained by `flow.flow_matching_loss` on the 8-mode ring of
`sampler_quality.py`, logit-normal t) draws (z, x_0 = Euler-100(z)) pairs (`reflow.write_pairs` does the
same for a workdir); the 2-rectified flow starts from it and trains on those pairs (Liu et al. 2022,
arXiv 2209.03003, §2.2). Reported for both and for the exact velocity of the ring (the flow that
flow matching converges to): the straightness S of 100-step Euler paths (`flow.straightness`, 0 for
straight lines) and the sliced W2 (`exact.sliced_wasserstein`) to independent exact samples after
1, 2, 4, 8 Euler steps (DDIM 'trailing' on `sde.Flow`), with the floor of two exact sets.

    python benchmarks/reflow_quality.py            # full: table to stdout and benchmarks/results/
    python benchmarks/reflow_quality.py --quick    # fewer steps and samples; prints only
"""

import argparse
import functools
import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import diffusion_jax as dj
from diffusion_jax import exact, flow, models

RESULTS = Path(__file__).parent / "results" / "reflow_quality.md"
NFES = (1, 2, 4, 8)
PROCESS = dj.sde.Flow()


def mixture() -> exact.GaussianMixture:
    """`sampler_quality.py`'s 2-D ring: 8 modes of std 0.05 on the unit circle."""
    return exact.ring(8, radius=1.0, std=0.05)


def train_flow(
    draw: Any, steps: int, params: nnx.State | None = None, batch: int = 512, seed: int = 0,
    learning_rate: float = 1e-3,
) -> tuple[nnx.GraphDef, nnx.State]:
    """Flow matching of the MLP on batches `draw(rng, batch) -> (x0, noise or None)`, from `params` or fresh; the
    MLP is wrapped as a flow run's model is (`models.Preconditioned(..., 'flow')`: it sees 1000 t)."""
    mlp = models.create("mlp", in_features=2, hidden=128, depth=3, dropout=0.0, rngs=nnx.Rngs(seed))
    graphdef, fresh = nnx.split(models.Preconditioned(mlp, "flow"))
    params = fresh if params is None else params
    tx = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))

    @jax.jit
    def step(params: nnx.State, opt_state: optax.OptState, x0: jax.Array, noise: jax.Array | None, key: jax.Array):
        def loss(params: nnx.State) -> jax.Array:
            return flow.flow_matching_loss(velocity_of(graphdef, params), x0, key, noise=noise)[0]

        grads = jax.grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    rng, opt_state = np.random.default_rng(seed), tx.init(params)
    for k in range(steps):
        x0, noise = draw(rng, batch)
        params, opt_state = step(params, opt_state, x0, noise, jax.random.key(k))
    return graphdef, params


def velocity_of(graphdef: nnx.GraphDef, params: nnx.State) -> dj.diffusion.ModelFn:
    return lambda x, t: nnx.merge(graphdef, params)(x, t)


def euler(velocity: dj.diffusion.ModelFn, z: jax.Array, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(x_0, the trajectory [steps + 1, N, 2]) of `steps` Euler steps from t = 1."""
    sample = functools.partial(dj.samplers.get("ddim"), velocity, PROCESS, steps=steps, prediction="velocity",
                               spacing="trailing", clip_x0=None, return_trajectory=True)
    x0, info = jax.jit(sample)(jax.random.key(0), z)
    return np.asarray(x0), np.asarray(info.trajectory)


def straightness(velocity: dj.diffusion.ModelFn, z: jax.Array) -> float:
    _, trajectory = euler(velocity, z, 100)
    times = np.concatenate([PROCESS.sampling_times(100, "trailing")[::-1], [0.0]])
    return float(jnp.mean(flow.straightness(jnp.asarray(trajectory), jnp.asarray(times, jnp.float32))))


def evaluate(steps: int, num_pairs: int, n: int) -> dict[str, Any]:
    mix = mixture()
    rng = np.random.default_rng(123)
    reference = mix.sample(rng, n)
    floor = exact.sliced_wasserstein(mix.sample(rng, n), reference)
    seconds = {}
    start = time.perf_counter()
    first = train_flow(lambda rng, b: (jnp.asarray(mix.sample(rng, b), jnp.float32), None), steps)
    seconds["1-rectified"] = time.perf_counter() - start
    z = jax.random.normal(jax.random.key(7), (num_pairs, 2))
    pairs_x0, _ = euler(velocity_of(*first), z, 100)  # reflow's coupling: (z, the 1-flow's sample of z)
    pairs_z = np.asarray(z)

    def draw_pairs(rng: np.random.Generator, b: int) -> tuple[jax.Array, jax.Array]:
        i = rng.integers(0, num_pairs, b)
        return jnp.asarray(pairs_x0[i]), jnp.asarray(pairs_z[i])

    start = time.perf_counter()
    second = train_flow(draw_pairs, steps, params=first[1], seed=1)
    seconds["2-rectified"] = time.perf_counter() - start
    flows = {"exact velocity (the limit of flow matching)": exact.velocity_model(mix, PROCESS),
             "1-rectified flow (flow matching)": velocity_of(*first),
             "2-rectified flow (reflow, from the 1-flow)": velocity_of(*second)}
    z_eval = jax.random.normal(jax.random.key(11), (n, 2))
    sw = {label: {k: exact.sliced_wasserstein(euler(v, z_eval, k)[0], reference) for k in NFES}
          for label, v in flows.items()}
    straight = {label: straightness(v, z_eval) for label, v in flows.items()}
    return {"sw": sw, "straightness": straight, "floor": floor, "train_seconds": seconds, "steps": steps,
            "num_pairs": num_pairs, "n": n}


def markdown(results: dict[str, Any]) -> str:
    lines = ["| flow | straightness S | " + " | ".join(f"SW, Euler {k}" for k in NFES) + " |",
             "|---|---|" + "---|" * len(NFES)]
    for label, cells in results["sw"].items():
        lines.append(f"| {label} | {results['straightness'][label]:.4f} | "
                     + " | ".join(f"{cells[k]:.4f}" for k in NFES) + " |")
    lines.append(f"| floor (two exact sets) | | {results['floor']:.4f} |" + " |" * (len(NFES) - 1))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="500 training steps, 2,000 samples; print only")
    args = parser.parse_args()
    steps, num_pairs, n = (500, 4000, 2000) if args.quick else (8000, 50_000, 20_000)
    results = evaluate(steps, num_pairs, n)
    table = markdown(results)
    print(table)
    print(json.dumps(results["train_seconds"]))
    if not args.quick:
        RESULTS.parent.mkdir(exist_ok=True)
        header = (f"# Reflow on the exact ring ({time.strftime('%Y-%m-%d')})\n\n`python benchmarks/reflow_quality.py`: "
                  f"{steps} flow-matching steps per flow (batch 512), {num_pairs} reflow pairs from 100 Euler "
                  f"steps, {n} samples per cell; training took "
                  + ", ".join(f"{k} {v:.0f} s" for k, v in results["train_seconds"].items()) + " (2 CPU cores).\n\n")
        RESULTS.write_text(header + table + "\n")
        RESULTS.with_suffix(".jsonl").open("a").write(json.dumps(results) + "\n")


if __name__ == "__main__":
    main()
