"""Sequence-parallel attention and the collectives of each mesh's steps (issue 20), in one command.

(a) Attention against sequence length: `jax.nn.dot_product_attention` on one device against ring attention
    (`models.ring_attention.sequence_parallel_attention`) with the tokens split over every device
    ('sequence' = device count), forward and forward + backward. Per-device memory is XLA's
    `memory_analysis()` of the compiled program (arguments + outputs + temporaries of one device); time is
    the median wall time of `--reps` calls.
(b) The HLO collectives of one train step (and one sampling chain) of a small DiT on digits, for each mesh:
    data parallel, FSDP, data x sequence, and the explicit-collective 'shard_map' step, counted by kind in the
    compiled (partitioned) module.

On this CPU the devices are simulated (`--xla_force_host_platform_device_count`, set here when unset) and
share two cores, so (a)'s times measure overhead, not scaling; the per-device memory is real. On a GPU/TPU
host run the same command: the devices are the real ones.

    python benchmarks/sequence_parallel.py                      # both parts, ~3 minutes here
    python benchmarks/sequence_parallel.py --part attention --lengths 1024 4096 16384 --heads 16
"""

import argparse
import os
import re
import statistics
import sys
import time

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()

import jax  # noqa: E402
import ml_collections  # noqa: E402

import diffusion_jax as dj  # noqa: E402
from diffusion_jax.models.ring_attention import sequence_parallel_attention  # noqa: E402
from diffusion_jax.training import experiment  # noqa: E402
from diffusion_jax.training import mesh as mesh_lib  # noqa: E402

COLLECTIVE = re.compile(r"\b(all-reduce|all-gather|collective-permute|reduce-scatter|all-to-all)(?:-start)?\(")


def per_device_mib(compiled: jax.stages.Compiled) -> float:
    m = compiled.memory_analysis()
    return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes) / 2**20


def timed(fn, *args, reps: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def attention_table(lengths: list[int], heads: int, head_dim: int, reps: int) -> list[str]:
    n = jax.device_count()
    ring_mesh = mesh_lib.make_mesh({"data": 1, "sequence": n})
    one = jax.devices()[0]
    lines = [f"Ring over {n} devices ({jax.devices()[0].platform}) vs one device; batch 1, {heads} heads of "
             f"{head_dim}; ms (median of {reps}) and MiB per device.", "",
             "| tokens | pass | one device ms | ring ms | one device MiB | ring MiB per device |",
             "|---|---|---|---|---|---|"]
    for t in lengths:
        tokens = jax.random.normal(jax.random.key(0), (1, t, heads, head_dim))
        qs = jax.device_put(tokens, jax.sharding.NamedSharding(ring_mesh, jax.sharding.PartitionSpec(None, "sequence")))
        q1 = jax.device_put(tokens, one)
        forward = {"one": lambda q: jax.nn.dot_product_attention(q, q, q),
                   "ring": lambda q: sequence_parallel_attention(q, q, q, ring_mesh)}
        for name, wrap in (("forward", lambda f: f), ("fwd+bwd", lambda f: jax.grad(lambda q: f(q).sum()))):
            row = {}
            for impl, x in (("one", q1), ("ring", qs)):
                fn = jax.jit(wrap(forward[impl]))
                compiled = fn.lower(x).compile()
                row[impl] = (timed(compiled, x, reps=reps), per_device_mib(compiled))
            line = (f"| {t} | {name} | {row['one'][0]:.1f} | {row['ring'][0]:.1f} | {row['one'][1]:.1f} | "
                    f"{row['ring'][1]:.1f} |")
            print(line, file=sys.stderr, flush=True)  # progress; the table follows on stdout
            lines.append(line)
    return lines


def dit_config(data_dir: str | None) -> ml_collections.ConfigDict:
    config = dj.config.base_config()
    config.data.update(name="digits", image_size=16, data_dir=data_dir)
    config.model = ml_collections.ConfigDict(dict(name="dit", patch_size=2, hidden_size=64, depth=4, num_heads=4))
    config.training.update(batch_size=32, ema_decays=(0.99,))
    config.sample.update(sampler="ddim", steps=10, batch_size=32, num_samples=32, ema_decay=0.99)
    config.mesh.fsdp_min_size = 0
    return config


def collectives_table(data_dir: str | None) -> list[str]:
    n = jax.device_count()
    meshes = {
        f"data={n}": ({"data": n}, "jit"),
        f"fsdp={n}": ({"data": 1, "fsdp": n}, "jit"),
        f"data=2, sequence={n // 2}": ({"data": 2, "sequence": n // 2}, "jit"),
        f"data={n}, step_impl='shard_map'": ({"data": n}, "shard_map"),
    }
    kinds = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
    lines = [f"DiT (64 tokens, width 64, depth 4), batch 32 over {n} devices: collectives in the compiled HLO.", "",
             "| mesh | program | " + " | ".join(kinds) + " |", "|---|---|" + "---|" * len(kinds)]
    for name, (sizes, step_impl) in meshes.items():
        config = dit_config(data_dir)
        config.mesh.update(sizes)
        config.training.step_impl = step_impl
        exp = experiment.build(config)
        state = exp.init_state()
        batch = next(experiment.training_batches(exp, config))
        programs = {"train step": experiment.jit_train_step(exp, config).lower(state, batch)}
        if step_impl == "jit":
            programs["sampling chain"] = exp.sample_fn.lower(state.params, jax.random.key(0))
        for program, lowered in programs.items():
            counts = {kind: 0 for kind in kinds}
            for match in COLLECTIVE.finditer(lowered.compile().as_text()):
                counts[match.group(1)] += 1
            line = f"| {name} | {program} | " + " | ".join(str(counts[k]) for k in kinds) + " |"
            print(line, file=sys.stderr, flush=True)  # progress; the table follows on stdout
            lines.append(line)
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("attention", "collectives", "both"), default="both")
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--data-dir", help="tfds data dir for the digits (default: tfds's; prepared if missing)")
    args = p.parse_args()
    dj.runtime.configure_xla_flags()
    start = time.perf_counter()
    if args.part in ("attention", "both"):
        print("\n".join(["## (a) attention", ""] + attention_table(args.lengths, args.heads, args.head_dim,
                                                                     args.reps)), flush=True)
    if args.part in ("collectives", "both"):
        print("\n".join(["", "## (b) collectives per program", ""] + collectives_table(args.data_dir)), flush=True)
    print(f"\n{time.perf_counter() - start:.0f}s; jax {jax.__version__}, {jax.device_count()} "
          f"{jax.devices()[0].platform} devices")


if __name__ == "__main__":
    main()
