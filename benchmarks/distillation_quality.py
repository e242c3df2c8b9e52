"""Few-step students against few-step samplers, on a Gaussian mixture whose denoiser is exact.

The teacher is `exact.x0_model` (E[x_0 | x_t] in closed form), so the samplers' only error is
discretisation and a student's is the discretisation it did not learn away. Four students, each
the `ddpm_swissroll` MLP:
- progressive distillation (`distill.progressive`, Salimans & Ho 2022), v-prediction on
  `schedules.linear(1000)`, in rounds from a 64-step DDIM teacher; round 0 learns two exact DDIM
  steps per student step from scratch (the exact teacher has no weights to copy), every later round
  starts from the previous student; each N-step student samples with DDIM 'trailing' on the grid it
  was trained for;
- consistency distillation from the exact denoiser and improved consistency training
  (`distill.consistency`; Song et al. 2023, Song & Dhariwal 2023), as consistency functions on
  EDM's σ in [0.002, 80], sampled with the `consistency` sampler (Algorithm 1) on Karras levels;
and MeanFlow (`diffusion_jax.meanflow`, Geng et al. 2025), the same MLP as an average velocity trained without a
teacher, sampled with the `meanflow` sampler's equal jumps.
Reported as `sampler_quality.py` does: SW, the sliced 2-Wasserstein distance to independent exact
samples (`exact.sliced_wasserstein`), with the floor of two exact sets, at NFE 1, 2, 4, 8, beside
DDIM ('trailing') and DPM-Solver++(2M) driven by the exact denoiser on `schedules.linear(1000)`.

    python benchmarks/distillation_quality.py            # full: table to stdout and benchmarks/results/
    python benchmarks/distillation_quality.py --quick    # fewer steps and samples; prints only
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
from diffusion_jax import exact, meanflow, models
from diffusion_jax.distill import consistency, progressive

RESULTS = Path(__file__).parent / "results" / "distillation_quality.md"
NFES = (1, 2, 4, 8)


def mixture() -> exact.GaussianMixture:
    """`sampler_quality.py`'s 2-D ring: 8 modes of std 0.05 on the unit circle."""
    return exact.ring(8, radius=1.0, std=0.05)


def distill_mlp(
    mix: exact.GaussianMixture, schedule: Any, teacher_steps: int, steps_per_round: int, batch: int = 512,
    seed: int = 0, learning_rate: float = 1e-3,
) -> dict[int, tuple[nnx.GraphDef, nnx.State]]:
    """Progressive distillation from the exact teacher: {N: (graphdef, params) of the N-step student}."""
    model = models.create("mlp", in_features=2, hidden=128, depth=3, dropout=0.0, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model)

    def student_fn(params: nnx.State) -> dj.diffusion.ModelFn:
        return lambda x, t: nnx.merge(graphdef, params)(x, t)

    tx = optax.adam(optax.cosine_decay_schedule(learning_rate, steps_per_round))
    students, teacher = {}, None  # teacher None: the exact denoiser
    rng = np.random.default_rng(seed)
    num_steps = teacher_steps // 2
    while num_steps >= 1:
        if teacher is None:
            teacher_fn, teacher_prediction = exact.x0_model(mix, schedule), "x0"
        else:
            teacher_fn, teacher_prediction = student_fn(teacher), "v"

        @jax.jit
        def step(params: nnx.State, opt_state: optax.OptState, x0: jax.Array, key: jax.Array,
                 teacher_fn=teacher_fn, teacher_prediction=teacher_prediction, n=num_steps):
            def loss(params: nnx.State) -> jax.Array:
                return progressive.distillation_loss(student_fn(params), teacher_fn, schedule, x0, key, jnp.int32(n),
                                                     prediction="v", teacher_prediction=teacher_prediction)[0]

            value, grads = jax.value_and_grad(loss)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, value

        opt_state = tx.init(params)
        for k in range(steps_per_round):
            x0 = jnp.asarray(mix.sample(rng, batch))
            params, opt_state, _ = step(params, opt_state, x0, jax.random.key(1000 * num_steps + k))
        students[num_steps] = (graphdef, params)
        teacher, num_steps = params, num_steps // 2
    return students


def consistency_mlp(
    mix: exact.GaussianMixture, kind: str, steps: int, batch: int = 512, seed: int = 0, learning_rate: float = 1e-3,
) -> tuple[nnx.GraphDef, nnx.State]:
    """A consistency model f = c_skip x + c_out MLP(c_in x, c_noise) trained by consistency distillation
    from the exact denoiser (kind 'cd': N = 18, Heun teacher steps, squared L2, target EMA 0.95, as the CD
    paper's CIFAR-10 setup) or by improved consistency training ('ict': no teacher, pseudo-Huber,
    lognormal levels, weight 1 / (σ_{n+1} - σ_n), N(k) from 11 to 1281, the target θ itself)."""
    model = models.create("mlp", in_features=2, hidden=128, depth=3, dropout=0.0, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model)
    grid = consistency.CIFAR10

    def f(params: nnx.State) -> dj.diffusion.ModelFn:
        return consistency.consistency_function(lambda x, t: nnx.merge(graphdef, params)(x, t), grid)

    teacher = exact.x0_model(mix, dj.sde.EDM())
    tx = optax.adam(learning_rate)

    @jax.jit
    def step(params: nnx.State, target: nnx.State, opt_state: optax.OptState, k: jax.Array, x0: jax.Array,
             key: jax.Array):
        def loss(params: nnx.State) -> jax.Array:
            if kind == "cd":
                return consistency.consistency_loss(f(params), f(target), x0, key, 18, teacher_denoise=teacher,
                                                    grid=grid)[0]
            n = consistency.ict_num_levels(k, steps)
            return consistency.consistency_loss(f(params), f(params), x0, key, n, grid=grid,
                                                distance_kind="pseudo_huber", level_sampling="lognormal",
                                                max_levels=1281, weighting="inverse_gap")[0]

        grads = jax.grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        target = optax.incremental_update(params, target, 1.0 - 0.95) if kind == "cd" else params
        return params, target, opt_state

    rng, target, opt_state = np.random.default_rng(seed), params, tx.init(params)
    for k in range(steps):
        params, target, opt_state = step(params, target, opt_state, jnp.int32(k), jnp.asarray(mix.sample(rng, batch)),
                                         jax.random.key(k))
    return graphdef, params


def meanflow_mlp(
    mix: exact.GaussianMixture, steps: int, batch: int = 512, seed: int = 0, learning_rate: float = 1e-3,
    t_sampling: str = "uniform", interval_ratio: float = 0.25,
) -> tuple[nnx.GraphDef, nnx.State]:
    """MeanFlow's average velocity u(z, r, t) (`diffusion_jax.meanflow`, no teacher) as the same MLP with the
    interval t - r embedded, on flow matching's path: (t, r) by `t_sampling`, r < t for `interval_ratio` of the
    batch, the plain squared error (adaptive weight p = 0)."""
    backbone = models.create("mlp", in_features=2, hidden=128, depth=3, dropout=0.0, interval_embedding=True,
                             rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(models.Preconditioned(backbone, "meanflow"))
    tx = optax.adam(learning_rate)

    @jax.jit
    def step(params: nnx.State, opt_state: optax.OptState, x0: jax.Array, key: jax.Array):
        def loss(params: nnx.State) -> jax.Array:
            u = lambda z, t, r: nnx.merge(graphdef, params)(z, meanflow.model_time(t, r))  # noqa: E731
            return meanflow.meanflow_loss(u, x0, key, interval_ratio=interval_ratio, t_sampling=t_sampling,
                                          adaptive_p=0.0)[0]

        updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    rng, opt_state = np.random.default_rng(seed), tx.init(params)
    for k in range(steps):
        params, opt_state = step(params, opt_state, jnp.asarray(mix.sample(rng, batch)), jax.random.key(k))
    return graphdef, params


def sample_meanflow(graphdef: nnx.GraphDef, params: nnx.State, nfe: int, n: int) -> np.ndarray:
    """The `meanflow` sampler: `nfe` equal jumps from t = 1 to 0."""
    x_T = jax.random.normal(jax.random.key(1), (n, 2))
    model_fn = lambda z, times: nnx.merge(graphdef, params)(z, times)  # noqa: E731
    sample = functools.partial(dj.samplers.get("meanflow"), model_fn, dj.sde.Flow(), steps=nfe)
    return np.asarray(jax.jit(sample)(jax.random.key(2), x_T))


def sample_consistency(graphdef: nnx.GraphDef, params: nnx.State, nfe: int, n: int) -> np.ndarray:
    """Algorithm 1 on EDM's Karras levels: NFE = levels."""
    process = dj.sde.EDM()
    x_T = process.prior_sample(jax.random.key(1), (n, 2))
    f = consistency.consistency_function(lambda x, t: nnx.merge(graphdef, params)(x, t))
    sample = functools.partial(dj.samplers.get("consistency"), f, process, steps=nfe)
    return np.asarray(jax.jit(sample)(jax.random.key(2), x_T))


def sample_student(graphdef: nnx.GraphDef, params: nnx.State, schedule: Any, steps: int, n: int) -> np.ndarray:
    """DDIM 'trailing' with the student's own step count."""
    x_T = jax.random.normal(jax.random.key(1), (n, 2))
    model_fn = lambda x, t: nnx.merge(graphdef, params)(x, t)  # noqa: E731
    sample = functools.partial(dj.samplers.get("ddim"), model_fn, schedule, steps=steps, prediction="v",
                               spacing="trailing")
    return np.asarray(jax.jit(sample)(jax.random.key(2), x_T))


def sample_exact(
    mix: exact.GaussianMixture, schedule: Any, sampler: str, nfe: int, n: int, **options: Any
) -> np.ndarray:
    """`sampler` at `nfe` steps driven by the exact denoiser."""
    x_T = jax.random.normal(jax.random.key(1), (n, 2))
    sample = functools.partial(dj.samplers.get(sampler), exact.x0_model(mix, schedule), schedule, steps=nfe,
                               prediction="x0", **options)
    return np.asarray(jax.jit(sample)(jax.random.key(2), x_T))


def evaluate(teacher_steps: int, steps_per_round: int, consistency_steps: int, n: int) -> dict[str, Any]:
    """SW to exact samples for every row and NFE, the floor, and the distillation's wall time."""
    mix, schedule = mixture(), dj.schedules.linear(1000)
    rng = np.random.default_rng(123)
    reference = mix.sample(rng, n)
    floor = exact.sliced_wasserstein(mix.sample(rng, n), reference)
    start = time.perf_counter()
    students = distill_mlp(mix, schedule, teacher_steps, steps_per_round)
    seconds = {"progressive": time.perf_counter() - start}
    consistency_models = {}
    for kind in ("cd", "ict"):
        start = time.perf_counter()
        consistency_models[kind] = consistency_mlp(mix, kind, consistency_steps)
        seconds[kind] = time.perf_counter() - start
    start = time.perf_counter()
    mean_flow = meanflow_mlp(mix, consistency_steps)
    seconds["meanflow"] = time.perf_counter() - start
    rows = {
        "ddim η=0 (trailing), exact denoiser": {k: sample_exact(mix, schedule, "ddim", k, n, spacing="trailing")
                                               for k in NFES},
        "dpm_solver++ 2M (logsnr), exact denoiser": {k: sample_exact(mix, schedule, "dpm_solver++", k, n, order=2)
                                                     for k in NFES},
        f"progressive distillation from {teacher_steps} steps": {
            k: sample_student(*students[k], schedule, k, n) for k in NFES if k in students},
        "consistency distillation (exact teacher)": {k: sample_consistency(*consistency_models["cd"], k, n)
                                                     for k in NFES},
        "improved consistency training": {k: sample_consistency(*consistency_models["ict"], k, n) for k in NFES},
        "MeanFlow (no teacher)": {k: sample_meanflow(*mean_flow, k, n) for k in NFES},
    }
    table = {label: {k: exact.sliced_wasserstein(x, reference) for k, x in cells.items()}
             for label, cells in rows.items()}
    return {"sw": table, "floor": floor, "train_seconds": seconds, "n": n, "teacher_steps": teacher_steps,
            "steps_per_round": steps_per_round, "consistency_steps": consistency_steps}


def markdown(results: dict[str, Any]) -> str:
    header = "| sampler | " + " | ".join(f"NFE {k}" for k in NFES) + " |"
    lines = [header, "|---|" + "---|" * len(NFES)]
    for label, cells in results["sw"].items():
        lines.append(f"| {label} | " + " | ".join(f"{cells[k]:.4f}" if k in cells else "—" for k in NFES) + " |")
    lines.append(f"| floor (two exact sets) | {results['floor']:.4f} |" + " |" * (len(NFES) - 1))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    teacher_steps, steps_per_round, consistency_steps, n = (64, 300, 2000, 4000) if args.quick else (
        64, 2000, 10000, 20000)
    results = evaluate(teacher_steps, steps_per_round, consistency_steps, n)
    seconds = results["train_seconds"]
    text = (f"SW to {n} exact samples of the 2-D ring (8 modes, std 0.05); PD on `schedules.linear(1000)`, "
            f"{steps_per_round} steps of batch 512 per round ({seconds['progressive']:.0f} s for all rounds); CD "
            f"and iCT on `sde.EDM`, {consistency_steps} steps of batch 512 ({seconds['cd']:.0f} s, "
            f"{seconds['ict']:.0f} s); MeanFlow on `sde.Flow`, as many ({seconds['meanflow']:.0f} s); "
            f"jax {jax.__version__}, {jax.devices()[0].platform}.\n\n" + markdown(results))
    print(text)
    if not args.quick:
        RESULTS.write_text("# Distillation quality\n\n" + text + "\n")
        with open(RESULTS.with_suffix(".jsonl"), "a") as f:
            f.write(json.dumps(results) + "\n")


if __name__ == "__main__":
    main()
