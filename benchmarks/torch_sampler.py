"""diffusers' sampling loop on the reference U-Nets: DDIM or DPM-Solver++(2M), images/s.

    python benchmarks/torch_sampler.py --config small --scheduler dpm --steps 20 [--bench ../shared/bench]

The model is `../shared/bench/torch_unet.py`'s (`build_model`, the same layouts as `throughput.py`'s
U-Nets); the loop is a diffusers pipeline's: `scheduler.set_timesteps(steps)`, then for each timestep
one `model(x, t)` under `torch.inference_mode()` and one `scheduler.step`. `--scheduler ddim` is
`DDIMScheduler` (η = 0), `dpm` is `DPMSolverMultistepScheduler` with its defaults (algorithm
'dpmsolver++', solver_order 2, lower_order_final). Prints one JSON line as torch_unet.py does, so
`compare.py` and `summarize.py` read it alike (mode 'ddim' or 'dpm').
"""

import argparse
import json
import os
import platform
import sys
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=["cifar", "small"], default="small")
    p.add_argument("--scheduler", choices=["ddim", "dpm"], default="dpm")
    p.add_argument("--steps", type=int, default=None, help="default: 50 (ddim), 20 (dpm)")
    p.add_argument("--batch", type=int, default=None, help="default: 16 for cifar, 64 for small")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", choices=["float32"], default="float32")
    p.add_argument("--bench", default=str(Path(__file__).resolve().parent.parent.parent / "shared" / "bench"))
    a = p.parse_args()
    sys.path.insert(0, os.path.abspath(a.bench))
    import benchutil
    import diffusers
    import torch
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
    from torch_unet import build_model

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    steps = a.steps or (50 if a.scheduler == "ddim" else 20)
    batch = a.batch or (16 if a.config == "cifar" else 64)
    model, cfg = build_model(a.config, None)
    model.eval()
    scheduler = (DDIMScheduler if a.scheduler == "ddim" else DPMSolverMultistepScheduler)(num_train_timesteps=1000)
    shape = (batch, cfg["in_channels"], cfg["sample_size"], cfg["sample_size"])

    def loop(n: int) -> torch.Tensor:
        scheduler.set_timesteps(n)
        x = torch.randn(shape)
        with torch.inference_mode():
            for t in scheduler.timesteps:
                x = scheduler.step(model(x, t).sample, t, x).prev_sample
        return x

    recs = benchutil.time_reps(lambda: loop(steps), a.reps, warmup=1, warmup_fn=lambda: loop(2))
    s = benchutil.summarize(recs, work_per_rep=batch)
    print(json.dumps({
        "bench": "torch", "config": a.config, "mode": "ddim" if a.scheduler == "ddim" else "dpm",
        "scheduler": type(scheduler).__name__, "steps": steps, "dtype": a.dtype, "batch": batch,
        "params": sum(p.numel() for p in model.parameters()), "time_s": s["time_s"],
        "images_per_s": s.get("per_s"), "n_clean_reps": s["n_clean_reps"], "other_load": s["other_load"],
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "python": platform.python_version()},
    }))


if __name__ == "__main__":
    main()
