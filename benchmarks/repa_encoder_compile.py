"""What passing REPA's frozen DINOv2 to the train step as an argument saves: program size, lowering, compiling.

A random DINOv2 of `--size` (Hugging Face's `Dinov2Config`: 'base' is DINOv2-B/14, 86.6M parameters, 344 MB)
is saved with `transformers` and read as `repa.encoder_path`; the run is `configs/ddpm_digits.py` at 16 x 16
(`repa.layer` 2: the 8 x 8 level) with `repa.encoder_resolution` 112 (8 x 8 tokens). The same jitted step
(`experiment.jit_train_step`) is lowered and compiled twice: with the encoder's weights bound as an argument (the
project's way, `Objective.frozen`) and closed over (its weights then constants of the program). Each is timed in
a fresh process, so neither reuses the other's caches. Prints one JSON line per variant (peak RSS: the
process's, loading the encoder included).

    python benchmarks/repa_encoder_compile.py --size base      # ~3 min on 2 CPU cores
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = {"tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128),
         "small": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536),
         "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)}


def save_encoder(folder: Path, size: str) -> None:
    """A random Hugging Face DINOv2 of `size` in `folder` (model.safetensors and config.json)."""
    import torch
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(image_size=518, patch_size=14, **SIZES[size])).save_pretrained(folder)


def measure(encoder_path: str, bound: bool) -> dict:
    """Lowers and compiles the REPA train step with the encoder bound as an argument or closed over."""
    import jax
    import jax.numpy as jnp

    from diffusion_jax.config import config_from_file
    from diffusion_jax.training import experiment

    config = config_from_file("configs/ddpm_digits.py")
    config.data.image_size = 16
    config.training.compilation_cache_dir = None  # each variant compiles; a cache hit would time a lookup
    config.repa.update(weight=0.5, layer=2, encoder="dinov2", encoder_path=encoder_path, encoder_resolution=112)
    exp = experiment.build(config)
    step = experiment.jit_train_step(exp, config)
    if not bound:  # what the step did before `Objective.frozen`: the weights closed over
        step = experiment.BoundStep(step._fn, None)
    b = config.training.batch_size
    batch = {"image": jax.ShapeDtypeStruct((b, 16, 16, 1), jnp.float32, sharding=exp.batch_sharding),
             "label": jax.ShapeDtypeStruct((b,), jnp.int32, sharding=exp.batch_sharding)}
    start = time.perf_counter()
    lowered = step.lower(exp.abstract_state, batch)
    lower_s = time.perf_counter() - start
    text_mb = len(lowered.as_text()) / 2**20
    start = time.perf_counter()
    lowered.compile()
    compile_s = time.perf_counter() - start
    frozen = sum(x.size for x in jax.tree.leaves(exp.objective.frozen)) * 4 / 2**20
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"bound_as_argument": bound, "encoder_mb": round(frozen, 1), "lower_s": round(lower_s, 2),
            "stablehlo_text_mb": round(text_mb, 2), "compile_s": round(compile_s, 2),
            "peak_rss_mb": round(peak_rss_mb)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="base")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: ENCODER_PATH,bound|closed
    args = parser.parse_args()
    if args.measure:
        path, how = args.measure.rsplit(",", 1)
        print(json.dumps(measure(path, how == "bound")))
        return
    with tempfile.TemporaryDirectory() as folder:
        save_encoder(Path(folder), args.size)
        for how in ("bound", "closed"):
            subprocess.run([sys.executable, __file__, f"--measure={folder},{how}"], check=True)


if __name__ == "__main__":
    main()
