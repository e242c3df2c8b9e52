"""Peak host memory of importing DiT-XL/2 (675M parameters) from a full-size synthetic checkpoint.

    python benchmarks/convert_memory.py [--workdir=/tmp/convert_memory] [--layout=diffusers|reference]

Writes a diffusers `DiTTransformer2DModel` folder (facebook/DiT-XL-2-256's transformer config; zeros, 750M
tensors with diffusers' 27 repeated embedders, 3.0 GB) or the reference `.pt` (675M, 2.7 GB) once, then runs
`convert.import_weights` for `configs/dit_xl2_imagenet256.py`'s model in a fresh process and reads that
process's peak resident set size (its own `getrusage(RUSAGE_SELF).ru_maxrss`). A second fresh process does all of
it but the import (JAX, the abstract model, the source opened), so the difference is the import's own cost.
The target (issue 15): at most ~2x the model's float32 size. Results: `results/convert_memory.md`.
"""

import argparse
import json
import subprocess
import sys
import textwrap
from pathlib import Path

DIT_XL2 = dict(sample_size=32, patch_size=2, in_channels=4, out_channels=8, num_layers=28, num_attention_heads=16,
               attention_head_dim=72, num_embeds_ada_norm=1000, norm_type="ada_norm_zero",
               norm_elementwise_affine=False, norm_eps=1e-6)

WRITE = """
import sys, json, numpy as np, torch
from pathlib import Path
from diffusers import DiTTransformer2DModel
out, layout, folder = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[4])
if layout == "diffusers":
    from safetensors.numpy import save_file
    with torch.device("meta"):
        model = DiTTransformer2DModel(**json.loads(sys.argv[3]))
    out.mkdir(parents=True, exist_ok=True)
    model.save_config(out)
    save_file({k: np.zeros(v.shape, np.float32) for k, v in model.state_dict().items()},
              str(out / "diffusion_pytorch_model.safetensors"))
else:  # the reference names, from the diffusers folder (tests/test_convert_dit.py's inverse of diffusers' script)
    sys.path.insert(0, "tests")
    from test_convert_dit import reference_state_dict
    torch.save(reference_state_dict(DiTTransformer2DModel.from_pretrained(folder)), out)
"""

MEASURE = """
import sys, jax
from diffusion_jax import convert
from diffusion_jax.config import config_from_file
from diffusion_jax.training.setup import build_model
config = config_from_file("configs/dit_xl2_imagenet256.py")
_, init = build_model(config, (32, 32, 4))
abstract = jax.eval_shape(init, jax.random.key(0))
source = convert.source.open_source(sys.argv[1])
if sys.argv[2] == "import":
    params = convert.import_weights(config, init, (32, 32, 4), sys.argv[1])
    jax.block_until_ready(params)
import resource
print(sum(leaf.size for leaf in jax.tree.leaves(abstract)), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_rss_gb(code: str, *args: str) -> tuple[float, int]:
    """(peak RSS in GB of a fresh `python -c code args`, as it reports it; the parameter count it prints)."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          check=True, cwd=Path(__file__).resolve().parents[1])
    count, peak_kib = done.stdout.split()[-2:]
    return int(peak_kib) * 1024 / 1e9, int(count)  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/convert_memory")
    parser.add_argument("--layout", choices=("diffusers", "reference"), default="diffusers")
    args = parser.parse_args()
    folder = Path(args.workdir) / "dit_xl2"
    path = folder if args.layout == "diffusers" else Path(args.workdir) / "DiT-XL-2-256x256.pt"
    for layout, target in (("diffusers", folder), (args.layout, path)):
        if not target.exists():
            subprocess.run([sys.executable, "-c", WRITE, str(target), layout, json.dumps(DIT_XL2), str(folder)],
                           check=True, cwd=Path(__file__).resolve().parents[1])
    baseline, _ = peak_rss_gb(MEASURE, str(path), "open")
    peak, count = peak_rss_gb(MEASURE, str(path), "import")
    fp32 = count * 4 / 1e9
    print(f"DiT-XL/2 from the {args.layout} layout: {count:,} parameters, {fp32:.2f} GB float32; "
          f"peak RSS {peak:.2f} GB with the import, {baseline:.2f} GB without it: the import adds "
          f"{peak - baseline:.2f} GB = {(peak - baseline) / fp32:.2f}x the model, the process peaks at "
          f"{peak / fp32:.2f}x")


if __name__ == "__main__":
    main()
