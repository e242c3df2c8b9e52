"""What latent diffusion costs and saves on this machine, at equal image size (16x16 digits):

    python benchmarks/latent.py --ae_workdir=runs/ae_digits [--reps 20] > benchmarks/results/latent-<date>.jsonl

  encode     the first stage's encoder, images -> s * z with z ~ q(z|x) (as every latent train step pays it
             when latents are not cached), in images/s and ms per image
  decode     the decoder, latents -> images (once per sample)
  train      the project's train step (`experiment.jit_train_step`) of configs/ldm_digits.py on 4x4x4 latents
             (text cross-attention), of the same with its encoder pass added (`train+encode`), and of
             configs/ddpm_digits.py's pixel U-Net on the 16x16x1 images it would otherwise train on,
             each as images/s; the JSON line ends with the ratios

Timings are medians over --reps calls after one warm-up, on whatever else the machine runs (say so
when reporting); both models see the same global batch (64). One JSON line per measurement.
"""

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def median_seconds(fn, reps: int) -> float:
    import jax

    jax.block_until_ready(fn())  # warm-up (compiles)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ae_workdir", default="runs/ae_digits")
    parser.add_argument("--data_dir", default=None, help="tfds data dir with the digits (default: tfds's)")
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()

    from diffusion_jax.runtime import configure_xla_flags

    configure_xla_flags("unet")
    import jax
    import jax.numpy as jnp

    from diffusion_jax import data
    from diffusion_jax.training import experiment

    def config_of(name: str):
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", f"{name}.py")
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = module.get_config()
        config.data.data_dir = args.data_dir
        config.training.batch_size = 64
        return config

    pixel_config, latent_config = config_of("ddpm_digits"), config_of("ldm_digits")
    latent_config.latent.autoencoder_workdir = args.ae_workdir
    latent_config.latent.scale_factor = 1.0  # its value does not change the cost
    results = {}

    pixel = experiment.build(pixel_config)
    batch = next(data.create_iterator(pixel_config.data, global_batch_size=64, seed=0, sharding=pixel.batch_sharding))
    state = pixel.init_state()
    step = experiment.jit_train_step(pixel, pixel_config)

    def pixel_step():
        nonlocal state
        state, metrics = step(state, batch)
        return metrics["loss"]

    results["train_pixel"] = 64 / median_seconds(pixel_step, args.reps)

    ldm = experiment.build(latent_config)
    first_stage = ldm.first_stage
    encode = jax.jit(lambda p, x, k: first_stage._replace(params=p).encode(x, k))
    decode = jax.jit(lambda p, z: first_stage._replace(params=p).decode(z))
    key = jax.random.key(0)
    seconds = median_seconds(lambda: encode(first_stage.params, batch["image"], key), args.reps)
    results["encode"] = 64 / seconds
    latents = encode(first_stage.params, batch["image"], key)
    results["decode"] = 64 / median_seconds(lambda: decode(first_stage.params, latents), args.reps)

    captioned = next(data.create_iterator(latent_config.data, global_batch_size=64, seed=0,
                                          sharding=ldm.batch_sharding))
    latent_batch = captioned | {"image": latents}
    state = ldm.init_state()
    step = experiment.jit_train_step(ldm, latent_config)

    def latent_step(encode_too: bool):
        nonlocal state
        images = encode(first_stage.params, captioned["image"], key) if encode_too else latent_batch["image"]
        state, metrics = step(state, latent_batch | {"image": images})
        return metrics["loss"]

    results["train_latent"] = 64 / median_seconds(lambda: latent_step(False), args.reps)
    results["train_latent_with_encode"] = 64 / median_seconds(lambda: latent_step(True), args.reps)
    print(json.dumps({
        "images_per_s": {k: round(v, 1) for k, v in results.items()},
        "encode_ms_per_image": round(1000 / results["encode"], 3),
        "ratio_latent_to_pixel_train": round(results["train_latent"] / results["train_pixel"], 3),
        "ratio_latent_with_encode_to_pixel_train": round(
            results["train_latent_with_encode"] / results["train_pixel"], 3
        ),
        "pixel": "configs/ddpm_digits.py U-Net on 16x16x1", "latent": "configs/ldm_digits.py U-Net on 4x4x4 + text",
        "devices": len(jax.devices()), "backend": jax.default_backend(), "reps": args.reps,
        "latent_shape": list(first_stage.latent_shape), "dtype": str(jnp.float32.dtype),
    }))


if __name__ == "__main__":
    main()
