"""SR3's consistency and the digits cascade's sample quality (`configs/sr_digits.py`, `configs/ddpm8_digits.py`):

    python benchmarks/super_resolution.py --sr_workdir=runs/sr_digits --stage1_workdir=runs/ddpm8_digits \
        --data_dir=/tmp/play/tfds > benchmarks/results/super_resolution-<date>.jsonl

  consistency  the SR model on the 297 test digits' area-downsampled 8x8 images x, sampled with its config's
               sampler: mean and max |A(y) - x| over pixels (A: area downsampling) in [-1, 1] units and in 8-bit
               levels (y quantised to uint8 as the sample files hold it), plain and with
               `super_resolution.consistent_denoiser` (DDNM's projection of every x̂_0), against nearest and
               bicubic upsampling of x; and the PSNR of each y against the real 16x16 digit.
  cascade      --num stage-1 samples (`super_resolution.cascade_inputs`: its config's sampler, quantised to
               uint8) super-resolved at `sample.low_res_noise` = --low_res_noise: digits-FID, IS analogue and
               class entropy at N = --num, beside those of the stage-1 samples themselves (8x8), of them
               upsampled by the data pipeline's bilinear resize (which the digits metric inverts exactly) and
               bicubically, and the consistency of the cascade's outputs with their stage-1 inputs.

One JSON line per measurement. Seeds are fixed; the numbers do not depend on the machine's load, the
seconds do.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sr_workdir", default="runs/sr_digits")
    parser.add_argument("--stage1_workdir", default="runs/ddpm8_digits")
    parser.add_argument("--data_dir", default=None, help="tfds data dir with the digits (default: tfds's)")
    parser.add_argument("--num", type=int, default=1500, help="cascade samples (the digits metric's N)")
    parser.add_argument("--batch", type=int, default=300, help="SR samples per compiled call")
    parser.add_argument("--low_res_noise", type=float, nargs="+", default=[0.0],
                        help="the cascade's sampling augmentation levels s, one cascade each")
    parser.add_argument("--skip", nargs="*", default=[], choices=["consistency", "cascade"])
    args = parser.parse_args()

    from diffusion_jax.runtime import configure_xla_flags

    configure_xla_flags("unet")
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np
    from PIL import Image

    import diffusion_jax as dj
    from diffusion_jax import sde, super_resolution
    from diffusion_jax.data import load_split
    from diffusion_jax.metrics import digits
    from diffusion_jax.training.sampling import to_uint8
    from diffusion_jax.training.setup import sampler_from_config

    sr = dj.load(args.sr_workdir)
    config = sr.config
    if args.data_dir:
        config.data.data_dir = args.data_dir
    size = config.model.low_res_size
    factor = sr.example_shape[0] // size
    sampler, options = sampler_from_config(config.sample)
    prediction = config.diffusion.prediction
    evaluator = digits.default_evaluator()

    @functools.partial(jax.jit, static_argnums=(2,))
    def super_resolve(low_res: jax.Array, level: jax.Array, project: bool, key: jax.Array) -> jax.Array:
        """SR samples [B, H, W, C] for low-res images [B, h, w, C] at augmentation level `level` [B]."""
        cond = {"low_res": low_res, "low_res_noise": level}
        model_fn = sr.model_fn(cond)
        if project:
            model_fn = super_resolution.consistent_denoiser(model_fn, sr.schedule, prediction, low_res)
        noise_key, chain_key = jax.random.split(key)
        x_T = sde.as_process(sr.schedule).prior_sample(noise_key, (low_res.shape[0], *sr.example_shape))
        return sampler(model_fn, sr.schedule, chain_key, x_T, prediction=prediction, **options)

    def run(low_res: np.ndarray, level: float, project: bool) -> np.ndarray:
        """float32 [N, H, W, C] SR samples of `low_res` [N, h, w, C], in batches of --batch (the last padded)."""
        out = []
        for start in range(0, len(low_res), args.batch):
            rows = np.arange(start, start + args.batch) % len(low_res)
            batch = jnp.asarray(low_res[rows], jnp.float32)
            levels = jnp.full((args.batch,), level, jnp.float32)
            out.append(np.asarray(super_resolve(batch, levels, project, jax.random.key(start))))
        return np.concatenate(out)[: len(low_res)]

    def consistency(images: np.ndarray, low_res: np.ndarray) -> dict:
        """|A(y) - x| of float images y [N, H, W, C] in [-1, 1] and of their uint8 quantisation."""
        err = np.abs(super_resolution.area_downsample(images.astype(np.float64), size) - low_res)
        quantised = to_uint8(images).astype(np.float64) / 127.5 - 1.0
        err8 = np.abs(super_resolution.area_downsample(quantised, size) - low_res) * 127.5
        return {"mean_abs": float(err.mean()), "max_abs": float(err.max()), "mean_abs_uint8_levels": float(err8.mean()),
                "max_abs_uint8_levels": float(err8.max())}

    def emit(record: dict) -> None:
        print(json.dumps(record), flush=True)

    upsample = {
        "nearest": lambda x: super_resolution.nearest_upsample(x, factor),
        "bicubic": lambda x: np.asarray(jax.image.resize(x, (len(x), *sr.example_shape), "bicubic")),
    }

    if "consistency" not in args.skip:
        test, _ = load_split(config.data, "test")  # uint8 [297, 16, 16, 1]
        truth = test.astype(np.float64) / 127.5 - 1.0
        low_res = super_resolution.area_downsample(truth, size)  # [297, 8, 8, 1]

        def psnr(images: np.ndarray) -> float:
            mse = np.mean((to_uint8(images).astype(np.float64) / 127.5 - 1.0 - truth) ** 2)
            return float(10 * np.log10(4.0 / mse))  # peak-to-peak 2 in [-1, 1]

        for name, up in upsample.items():
            images = up(low_res)
            emit({"measure": "consistency", "method": f"{name} upsampling", "n": len(test), **consistency(
                images, low_res), "psnr_db": psnr(images)})
        for project in (False, True):
            start = time.perf_counter()
            images = run(low_res, 0.0, project)
            emit({"measure": "consistency", "method": "SR" + (" + consistent_denoiser" if project else ""),
                  "sampler": config.sample.sampler, "steps": config.sample.steps, "n": len(test),
                  **consistency(images, low_res), "psnr_db": psnr(images),
                  "digits_fid_n297": evaluator.fid(to_uint8(images)), "seconds": time.perf_counter() - start})

    if "cascade" not in args.skip:
        config.sample.low_res_workdir = args.stage1_workdir
        start = time.perf_counter()
        stage1 = super_resolution.cascade_inputs(config, args.num, jax.random.key(1))["low_res"]  # [N, 8, 8, 1]
        seconds = time.perf_counter() - start

        def scores(images: np.ndarray) -> dict:
            images = to_uint8(images)
            return {"digits_fid": evaluator.fid(images), "digits_is": evaluator.inception_score(images),
                    "digits_class_entropy": evaluator.class_entropy(images)}

        emit({"measure": "cascade", "method": "stage 1 alone (8x8)", "n": args.num, **scores(stage1),
              "seconds": seconds})
        bilinear = np.stack([np.asarray(Image.fromarray(im[..., 0]).resize(sr.example_shape[:2],
                                                                          Image.Resampling.BILINEAR))[..., None]
                             for im in to_uint8(stage1)]).astype(np.float32) / 127.5 - 1.0
        emit({"measure": "cascade", "method": "stage 1 + the pipeline's bilinear upsampling", "n": args.num,
              **scores(bilinear)})
        emit({"measure": "cascade", "method": "stage 1 + bicubic upsampling", "n": args.num,
              **scores(upsample["bicubic"](stage1))})
        for level in args.low_res_noise:
            config.sample.low_res_noise = level
            low_res = super_resolution.conditioning_inputs(config, stage1)["low_res"]  # augmented at `level`
            start = time.perf_counter()
            images = run(low_res, level, False)
            emit({"measure": "cascade", "method": "stage 1 + SR", "low_res_noise": level, "n": args.num,
                  "sampler": config.sample.sampler, "steps": config.sample.steps, **scores(images),
                  "consistency_with_stage1": consistency(images, stage1), "seconds": time.perf_counter() - start})
            np.savez(os.path.join(args.sr_workdir, f"cascade_{args.num}_s{level}.npz"), arr_0=to_uint8(images))


if __name__ == "__main__":
    main()
