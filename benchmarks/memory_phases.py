"""Where a train step's resident memory comes from: RSS after each phase of building and running it.

    python benchmarks/memory_phases.py [--model unet-small] [--no-release]

Phases: imports; the model and train state (their init programs compiled and run); the step traced
and lowered; compiled (then `runtime.release_free_heap()`, as `training.throughput.compile_step`
does, unless --no-release); three steps. Prints current and peak RSS (/proc/self/statm, getrusage)
after each, and XLA's temporary buffer for the step (`memory_analysis()`).
"""

import argparse
import os
import resource
import sys


def rss() -> str:
    current = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    return f"current {current:.0f} MB, peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["unet-small", "unet-cifar", "dit-s2"], default="unet-small")
    p.add_argument("--no-release", action="store_true", help="do not return the compiler's freed heap")
    args = p.parse_args(argv)
    from diffusion_jax import runtime

    runtime.configure_xla_flags("dit" if args.model.startswith("dit") else "unet")
    import jax
    import throughput


    print("imports:", rss())
    config, shape, batch = throughput.build_config(throughput.parse_args(["--model", args.model]))
    step, state, batch_dict = throughput.build_train_step(config, shape, batch)
    print("model and train state:", rss())
    lowered = step.lower(state, batch_dict)
    print("traced and lowered:", rss())
    compiled = lowered.compile()
    print("compiled:", rss(), f"(XLA temp {compiled.memory_analysis().temp_size_in_bytes / 2**20:.0f} MB)")
    if not args.no_release:
        runtime.release_free_heap()
        print("freed heap released:", rss())
    for _ in range(3):
        state, metrics = compiled(state, batch_dict)
        jax.block_until_ready(metrics["loss"])
    print("three steps:", rss())


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from diffusion_jax.runtime import reexec_with_huge_page_malloc

    reexec_with_huge_page_malloc()
    main()
