"""Eval mode: likelihoods on a data split and sample quality from N samples, each number written next
to the protocol that produced it.

    python -m diffusion_jax.main --config=configs/ddpm_digits.py --workdir=runs/digits --mode=eval \\
        --config.eval.metrics="('vlb_bpd','ode_bpd','digits')"

`config.eval.metrics` picks from:
- 'vlb_bpd': the variational bound in bits/dim on `eval.split` (Ho et al. 2020 Eq. 5, all T terms,
  the prior and the discretised decoder; `vlb.vlb_bpd`), with the mean of each term saved to
  `eval/vlb_terms_<step>.npz` (`terms` [T], `prior`); for a VDM (`diffusion.process='vdm'`) its continuous-time
  VLB (Kingma et al. 2021, Eq. 17: prior, `vdm.decoder`'s reconstruction and the diffusion loss at one
  antithetic t per example; `vdm.vlb`), repeated `eval.vdm_time_samples` times;
- 'ode_bpd': bits/dim from the probability-flow ODE (Song et al. 2021, App. D.2; `likelihood`),
  uniformly dequantised, averaged over `eval.ode_repeats` dataset repeats;
- 'fid', 'inception_score', 'kid': from `eval.num_samples` samples drawn with `config.sample`, in the
  feature space of the FID Inception-v3 (`metrics.inception`; weights from `eval.inception_weights`),
  against statistics of `eval.reference_split` (cached in `eval/`) or `eval.reference_stats`;
- 'digits': digits-FID, the Inception-Score analogue and (class-conditional models) class accuracy from
  the shipped digits classifier (`metrics.digits`).

Results go to `<workdir>/eval/eval_<step>.json` ({"step", "metrics", "protocol"}), to `metrics.jsonl`
and TensorBoard as `eval/<name>` scalars. The same `Evaluator` runs during training every
`eval.every` steps.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from diffusion_jax import data, distributed, latent, likelihood, sde, vdm, vlb
from diffusion_jax.data import captions
from diffusion_jax.errors import ConfigError
from diffusion_jax.metrics import stats
from diffusion_jax.training import experiment
from diffusion_jax.training.checkpoint import Checkpointer
from diffusion_jax.training.sampling import generate, sample_labels, sample_prompts, to_uint8
from diffusion_jax.training.setup import bind_process, model_apply, network_output_fn, process_memo, sampler_from_config
from diffusion_jax.training.state import TrainState
from diffusion_jax.training.writer import MetricWriter

INCEPTION_METRICS = ("fid", "inception_score", "kid")
RECONSTRUCTION_METRICS = ("psnr", "ssim")  # of a first stage's reconstructions of `eval.split`
FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
)


def _sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def vlb_variance(config: ml_collections.ConfigDict) -> str:
    """The reverse-step variance the VLB is evaluated with (`eval.variance`, see `diffusion_jax.config`)."""
    if config.eval.get("variance") is not None:
        variance = config.eval.variance
    elif config.model.get("learn_sigma"):
        variance = "learned_range"
    else:
        variance = config.sample.get("variance") or "fixed_small"
    vlb.check_variance(variance)
    if variance == "learned_range" and not config.model.get("learn_sigma"):
        raise ConfigError("eval.variance: 'learned_range' needs a model trained with model.learn_sigma=True")
    return variance


class Evaluator:
    """Computes `config.eval.metrics` for a train state; builds its data and networks once.

    Every check of the eval fields runs in the constructor, before anything is compiled.
    """

    def __init__(self, config: ml_collections.ConfigDict, exp: experiment.Experiment, workdir: str | Path):
        self.config, self.exp = config, exp
        self.workdir = Path(workdir)
        self.eval = config.eval
        self.metrics = tuple(self.eval.metrics)
        if not self.metrics:
            raise ConfigError("eval.metrics: empty; name at least one metric")
        if config.training.get("objective", "denoise") == "classify":
            raise ConfigError(
                "eval.metrics: a training.objective='classify' run is a classifier, not a diffusion model"
            )
        if len(exp.example_shape) != 3:
            raise ConfigError(
                f"eval.metrics: {', '.join(self.metrics)} need an image dataset; data.name={config.data.name!r} "
                "is 2-D toy data"
            )
        self.autoencode = config.training.get("objective", "denoise") == "autoencode"
        if self.autoencode != any(m in self.metrics for m in RECONSTRUCTION_METRICS) or (
            self.autoencode and set(self.metrics) - {*RECONSTRUCTION_METRICS, "digits"}
        ):
            raise ConfigError(
                f"eval.metrics: {', '.join(self.metrics)}; a training.objective='autoencode' run is scored on its "
                f"reconstructions with any of {RECONSTRUCTION_METRICS + ('digits',)}, and only it"
            )
        if exp.first_stage is not None and {"vlb_bpd", "ode_bpd"} & set(self.metrics):
            raise ConfigError("eval.metrics: a latent diffusion model's likelihood is of latents, not of pixels; "
                              "vlb_bpd and ode_bpd are for pixel-space runs")
        if "digits" in self.metrics and config.data.name != "digits":
            raise ConfigError(f"eval.metrics: 'digits' scores the digits dataset; data.name is {config.data.name!r}")
        self.weights = self.eval.get("inception_weights")
        if any(m in self.metrics for m in INCEPTION_METRICS):
            if self.weights is None:
                raise ConfigError(
                    "eval.inception_weights: FID, IS and KID need the FID Inception weights; download "
                    f"{FID_WEIGHTS_URL} once and pass its path (nothing is downloaded for you)"
                )
            if not Path(self.weights).is_file():
                raise ConfigError(f"eval.inception_weights: no file at {self.weights}")
        reference = self.eval.get("reference_stats")
        if reference is not None and not Path(reference).is_file():
            raise ConfigError(f"eval.reference_stats: no file at {reference}")
        vdm_run = config.diffusion.get("process", "discrete") == "vdm"  # its VLB has no reverse-step variance
        self.variance = vlb_variance(config) if "vlb_bpd" in self.metrics and not vdm_run else None
        if "ode_bpd" in self.metrics and self.eval.ode_probe not in likelihood.PROBES:
            raise ConfigError(
                f"eval.ode_probe: unknown probe {self.eval.ode_probe!r}; choose one of: {', '.join(likelihood.PROBES)}"
            )
        self.learn_sigma = bool(config.model.get("learn_sigma"))
        self.num_classes = config.model.get("num_classes")
        self._split: tuple[np.ndarray, np.ndarray] | None = None
        self._extractor = None
        self._vlb_fn = self._ode_fn = None

    # --- likelihoods --------------------------------------------------------------------------

    def _data(self) -> tuple[np.ndarray, np.ndarray]:
        """`eval.split` (its first `eval.num_examples`): uint8 images [N, S, S, C], labels [N]."""
        if self._split is None:
            images, labels = data.load_split(self.config.data, self.eval.split)
            n = self.eval.get("num_examples") or len(images)
            self._split = images[:n], labels[:n]
        return self._split

    def _batches(self) -> list[tuple[jax.Array, jax.Array, int]]:
        """The split in `eval.batch_size` batches on the mesh; the last one padded with its first
        examples (their results are dropped): (images uint8, labels, real count) each."""
        images, labels = self._data()
        size = self.eval.batch_size
        sharding = self.exp.batch_sharding
        out = []
        for start in range(0, len(images), size):
            count = min(size, len(images) - start)
            index = np.arange(start, start + size) % len(images) if count < size else np.arange(start, start + size)
            batch_images, batch_labels = images[index], labels[index]
            out.append((
                jax.make_array_from_callback(batch_images.shape, sharding, lambda i, a=batch_images: a[i]),
                jax.make_array_from_callback(batch_labels.shape, sharding, lambda i, a=batch_labels: a[i]),
                count,
            ))
        return out

    def _model_fn(self, params: nnx.State, labels: jax.Array, full_output: bool):
        cond = labels if self.num_classes is not None else None
        output = (lambda out: out) if full_output else network_output_fn(self.learn_sigma, {})
        graphdef = self.exp.graphdef

        def model_fn(x_t: jax.Array, t: jax.Array) -> jax.Array:
            return output(model_apply(graphdef, params, x_t, t, cond))

        return model_fn

    def vdm_vlb_bpd(self, params: nnx.State, key: jax.Array) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        """A VDM's continuous VLB (`vdm.vlb`) on `eval.split`: per example the mean of `eval.vdm_time_samples`
        one-t estimates (antithetic within a batch), its terms in bits/dim."""
        if self._vlb_fn is None:
            graphdef, repeats = self.exp.graphdef, self.eval.vdm_time_samples
            grid = None if self.config.vdm.decoder == "gaussian" else jnp.arange(256, dtype=jnp.float32) / 127.5 - 1.0

            def vlb_fn(params: nnx.State, images: jax.Array, labels: jax.Array, key: jax.Array) -> dict:
                model = nnx.merge(graphdef, params)
                cond = labels if self.num_classes is not None else None
                x = images.astype(jnp.float32) / 127.5 - 1.0
                eps_fn = lambda z, gamma: model.eps(z, gamma, cond)  # noqa: E731
                draws = jax.lax.map(lambda k: vdm.vlb(eps_fn, model.gamma, x, k, grid), jax.random.split(key, repeats))
                return jax.tree.map(lambda v: jnp.mean(v, axis=0), draws)

            self._vlb_fn = jax.jit(vlb_fn)
        parts = {name: [] for name in ("bpd", "prior", "reconstruction", "diffusion")}
        batches = self._batches()
        for i, (images, labels, count) in enumerate(batches):
            out = distributed.fetch(self._vlb_fn(params, images, labels, jax.random.fold_in(key, i)))
            for name in parts:
                parts[name].append(out[name][:count])
            logging.info("VDM VLB: batch %d/%d, %.4f bits/dim so far", i + 1, len(batches),
                         np.concatenate(parts["bpd"]).mean())
        total = np.concatenate(parts["bpd"])
        to_bpd = 1.0 / vdm.bits_per_nat_factor(self.exp.example_shape)  # nats per example -> bits/dim
        scalars = {
            "vlb_bpd": float(total.mean()),
            "vlb_bpd_prior": float(np.concatenate(parts["prior"]).mean() * to_bpd),
            "vlb_bpd_decoder": float(np.concatenate(parts["reconstruction"]).mean() * to_bpd),
            "vlb_bpd_diffusion": float(np.concatenate(parts["diffusion"]).mean() * to_bpd),
            "vlb_bpd_sem": float(total.std(ddof=1) / math.sqrt(len(total))) if len(total) > 1 else 0.0,
        }
        return scalars, {name: np.concatenate(values) for name, values in parts.items()}

    def vlb_bpd(self, params: nnx.State, key: jax.Array) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        if self.config.diffusion.get("process", "discrete") == "vdm":
            return self.vdm_vlb_bpd(params, key)
        if self._vlb_fn is None:
            schedule, prediction, clip_x0 = self.exp.schedule, self.config.diffusion.prediction, self.eval.clip_x0

            def vlb_fn(params: nnx.State, images: jax.Array, labels: jax.Array, key: jax.Array) -> vlb.VLB:
                x0 = images.astype(jnp.float32) / 127.5 - 1.0
                model_fn = self._model_fn(params, labels, full_output=self.variance == "learned_range")
                return vlb.vlb_bpd(
                    model_fn, schedule, x0, key, prediction=prediction, variance=self.variance, clip_x0=clip_x0
                )

            self._vlb_fn = jax.jit(vlb_fn)
        totals, priors, terms = [], [], []
        batches = self._batches()
        for i, (images, labels, count) in enumerate(batches):
            out = distributed.fetch(self._vlb_fn(params, images, labels, jax.random.fold_in(key, i)))
            totals.append(out.total[:count])
            priors.append(out.prior[:count])
            terms.append(out.terms[:count])
            logging.info("VLB: batch %d/%d, %.4f bits/dim so far", i + 1, len(batches), np.concatenate(totals).mean())
        total, prior, term = np.concatenate(totals), np.concatenate(priors), np.concatenate(terms)
        mean_terms = term.mean(axis=0)
        scalars = {
            "vlb_bpd": float(total.mean()),
            "vlb_bpd_prior": float(prior.mean()),
            "vlb_bpd_decoder": float(mean_terms[0]),
            "vlb_bpd_sem": float(total.std(ddof=1) / math.sqrt(len(total))) if len(total) > 1 else 0.0,
        }
        return scalars, {"terms": mean_terms, "prior": np.asarray(prior.mean())}

    def ode_bpd(self, params: nnx.State, key: jax.Array) -> tuple[dict[str, float], int]:
        if self._ode_fn is None:
            prediction, e = self.config.diffusion.prediction, self.eval

            def ode_fn(process, params: nnx.State, images: jax.Array, labels: jax.Array, key: jax.Array):
                return likelihood.ode_bits_per_dim(
                    self._model_fn(params, labels, full_output=False), process, key, images, prediction,
                    num_repeats=e.ode_repeats, probe=e.ode_probe, num_probes=e.ode_num_probes,
                    ode_solver=e.ode_solver, rtol=e.ode_rtol, atol=e.ode_atol,
                )

            self._ode_fn = process_memo(lambda process: jax.jit(functools.partial(ode_fn, process)))
        ode_fn = self._ode_fn(bind_process(self.exp.schedule, self.exp.graphdef, params))  # a VDM: its γ's process
        values, nfe = [], 0
        batches = self._batches()
        for i, (images, labels, count) in enumerate(batches):
            bpd, batch_nfe = distributed.fetch(ode_fn(params, images, labels, jax.random.fold_in(key, i)))
            values.append(bpd[:count])
            nfe = max(nfe, int(batch_nfe))
            logging.info("ODE likelihood: batch %d/%d (%d NFE), %.4f bits/dim so far", i + 1, len(batches),
                         int(batch_nfe), np.concatenate(values).mean())
        bpd = np.concatenate(values)
        sem = float(bpd.std(ddof=1) / math.sqrt(len(bpd))) if len(bpd) > 1 else 0.0
        return {"ode_bpd": float(bpd.mean()), "ode_bpd_sem": sem}, nfe

    # --- sample quality -----------------------------------------------------------------------

    def _inception(self):
        from diffusion_jax.metrics.inception import InceptionFeatures

        if self._extractor is None:
            self._extractor = InceptionFeatures(self.weights, batch_size=self.eval.inception_batch_size)
        return self._extractor

    def _reference(self, need_features: bool) -> tuple[stats.FeatureStats, np.ndarray | None, str]:
        """(statistics, features or None, where they came from) of the Inception reference."""
        from diffusion_jax.metrics.fid import compute_features

        given = self.eval.get("reference_stats")
        if given is not None and not need_features:
            return stats.load_stats(given), None, str(given)
        d = self.config.data
        name = f"reference_{d.name}_{self.eval.reference_split}_{self.exp.example_shape[0]}.npz"
        cache = self.workdir / "eval" / name
        if cache.is_file():
            with np.load(cache) as f:
                ref = stats.FeatureStats(f["mu"], f["sigma"], int(f["num"]))
                features = np.asarray(f["features"])
        else:
            images, _ = data.load_split(d, self.eval.reference_split)
            logging.info("Computing Inception reference statistics of %s/%s (%d images)", d.name,
                         self.eval.reference_split, len(images))
            features, _ = compute_features(images, self._inception())
            ref = stats.feature_stats(features)
            cache.parent.mkdir(parents=True, exist_ok=True)
            if jax.process_index() == 0:
                np.savez(cache, mu=ref.mu, sigma=ref.sigma, num=ref.num, features=features)
        if given is not None:
            return stats.load_stats(given), features, str(given)
        return ref, features, f"{d.name}/{self.eval.reference_split} ({cache})"

    def sample_metrics(self, params: nnx.State, key: jax.Array) -> tuple[dict[str, float], dict[str, Any]]:
        from diffusion_jax.metrics import digits
        from diffusion_jax.metrics.fid import compute_features

        n = self.eval.num_samples
        samples, nfe = generate(self.exp.sample_fn, params, key, n)
        images = to_uint8(samples)
        scalars: dict[str, float] = {}
        protocol: dict[str, Any] = {"num_samples": n, "nfe": nfe}
        if any(m in self.metrics for m in INCEPTION_METRICS):
            pool, logits = compute_features(images, self._inception())
            protocol["inception"] = {
                "network": "FID Inception-v3 (the 2015-12-05 TF graph as ported by pytorch-fid)",
                "weights": str(self.weights),
                "weights_sha256": _sha256(self.weights),
                "preprocessing": "uint8 / 255, grey -> RGB, bilinear resize to 299x299, 2x - 1",
            }
            if "fid" in self.metrics or "kid" in self.metrics:
                ref, ref_features, source = self._reference(need_features="kid" in self.metrics)
                protocol["inception"].update(reference=source, reference_num=ref.num)
                if "fid" in self.metrics:
                    scalars["fid"] = stats.fid_from_stats(stats.feature_stats(pool), ref)
                if "kid" in self.metrics:
                    mean, std = stats.kernel_inception_distance(
                        pool, ref_features, self.eval.kid_subsets, self.eval.kid_subset_size, seed=self.eval.seed
                    )
                    scalars.update(kid=mean, kid_std=std)
                    protocol["inception"].update(kid_subsets=self.eval.kid_subsets,
                                                 kid_subset_size=min(self.eval.kid_subset_size, n, ref.num))
            if "inception_score" in self.metrics:
                scalars["inception_score"], scalars["inception_score_std"] = stats.inception_score(logits, 10)
                protocol["inception"]["is_splits"] = 10
        if "digits" in self.metrics:
            evaluator = digits.default_evaluator()
            scalars["digits_fid"] = evaluator.fid(images)
            scalars["digits_is"] = evaluator.inception_score(images)
            scalars["digits_class_entropy"] = evaluator.class_entropy(images)
            protocol["digits"] = {
                "classifier": digits.VERSION,
                "reference": f"digits/train ({evaluator.reference.num} images, shipped with the classifier)",
                "is_splits": 1,
            }
            if self.config.model.get("text_encoder") is not None:  # captions: their digit and their properties
                labels, requested = prompt_targets(self.config.sample.get("prompts"), self.config.sample.batch_size, n)
                scalars["digits_accuracy"] = evaluator.class_accuracy(images, labels)
                followed = captions.follows_levels(images, labels, requested)
                scalars |= {f"{name}_{k}": v for name, report in followed.items() for k, v in report.items()}
                protocol["digits"]["captions"] = "sample.prompts" if self.config.sample.get("prompts") else (
                    "digits captions cycling 0-9 and thick / thin / leaning right / leaning left / nothing more")
            elif self.num_classes is not None:
                labels = sample_labels(self.config.sample.batch_size, self.num_classes, n)
                scalars["digits_accuracy"] = evaluator.class_accuracy(images, labels)
        return scalars, protocol

    # --- a first stage's reconstructions --------------------------------------------------------

    def reconstruction_metrics(self, params: nnx.State) -> dict[str, float]:
        """PSNR, SSIM and (with 'digits') the digits metric of `eval.split`'s reconstructions through the
        posterior mean: the digits-FID of reconstructions is LDM's rFID, with the digits classifier's features."""
        from diffusion_jax.metrics import digits, image_quality

        images, labels = self._data()
        graphdef = self.exp.graphdef

        @jax.jit
        def reconstruct(params: nnx.State, x: jax.Array) -> jax.Array:
            x_rec, _ = nnx.merge(graphdef, params).autoencoder(x, sample_posterior=False)
            return jnp.clip(x_rec, -1.0, 1.0)

        batch = self.eval.batch_size
        x = images.astype(np.float32) / 127.5 - 1.0
        rec = np.concatenate([np.asarray(reconstruct(params, x[i : i + batch])) for i in range(0, len(x), batch)])
        scalars = {}
        if "psnr" in self.metrics:
            scalars["psnr"] = float(np.mean(image_quality.psnr(x, rec)))
        if "ssim" in self.metrics:
            scalars["ssim"] = float(np.mean(image_quality.ssim(x, rec)))
        if "digits" in self.metrics:
            evaluator = digits.default_evaluator()
            rec_uint8 = to_uint8(rec)
            scalars |= {"digits_rfid": evaluator.fid(rec_uint8), "digits_accuracy": evaluator.class_accuracy(
                rec_uint8, labels), "digits_fid_of_inputs": evaluator.fid(images)}
        return scalars

    # --- all of it ----------------------------------------------------------------------------

    def __call__(self, state: TrainState, step: int, ema_sigma_rel: float | None = None) -> dict[str, Any]:
        """{"step", "metrics": {name: float}, "protocol": {...}} for `state` (a checkpoint of `step`), sampled with
        `config.sample`'s parameters or, given `ema_sigma_rel`, that power EMA (post hoc: `ema_snapshots`);
        writes the VLB's per-term means to `<workdir>/eval/vlb_terms_<step>.npz` (process 0)."""
        config, e = self.config, self.eval
        if ema_sigma_rel is not None:
            config = config.copy_and_resolve_references()
            config.sample.ema_sigma_rel = ema_sigma_rel
        params = experiment.sampling_params(config, state, self.workdir)
        key = jax.random.fold_in(jax.random.key(e.seed), step)
        decay, sigma_rel = config.sample.ema_decay, config.sample.get("ema_sigma_rel")
        protocol: dict[str, Any] = {
            "checkpoint_step": step,
            "params": f"power EMA sigma_rel {sigma_rel}" if sigma_rel is not None else
                      "raw" if decay is None else f"EMA {decay}",
            "dataset": config.data.name,
            "image_shape": list(self.exp.example_shape),
            "seed": e.seed,
        }
        scalars: dict[str, float] = {}
        if "vlb_bpd" in self.metrics or "ode_bpd" in self.metrics:
            images, _ = self._data()
            protocol["likelihood_data"] = {"split": e.split, "num_examples": len(images), "batch_size": e.batch_size,
                                           "levels": 256, "scaling": "uint8 / 127.5 - 1"}
        if "vlb_bpd" in self.metrics:
            values, arrays = self.vlb_bpd(params, jax.random.fold_in(key, 0))
            scalars.update(values)
            protocol["vlb"] = {
                "variance": self.variance, "clip_x0": e.clip_x0, "num_timesteps": self.exp.schedule.num_timesteps,
                "estimator": "all T terms + the prior, one x_t draw per term and example (Ho et al. Eq. 5)",
                "decoder": "discretised Gaussian on 256 levels (Ho et al. Eq. 13)",
            } if self.variance is not None else {
                "estimator": f"continuous-time VLB (Kingma et al. 2021, Eq. 17): prior + reconstruction + the "
                             f"diffusion loss at {e.vdm_time_samples} antithetic t per example",
                "decoder": {"discrete": "softmax over the 256 levels (VDM App. C)",
                            "gaussian": "Gaussian N(x; z_0 / α_0, σ_0² / α_0²)"}[self.config.vdm.decoder],
            }
            if jax.process_index() == 0:
                path = self.workdir / "eval" / f"vlb_terms_{step}.npz"
                path.parent.mkdir(parents=True, exist_ok=True)
                np.savez(path, **arrays)
        if "ode_bpd" in self.metrics:
            values, nfe = self.ode_bpd(params, jax.random.fold_in(key, 1))
            scalars.update(values)
            process = sde.as_process(bind_process(self.exp.schedule, self.exp.graphdef, params))
            protocol["ode"] = {
                "probe": e.ode_probe, "num_probes": e.ode_num_probes, "repeats": e.ode_repeats,
                "solver": e.ode_solver, "rtol": e.ode_rtol, "atol": e.ode_atol, "t_min": float(process.t_min),
                "t_max": float(process.t_max),
                "nfe_per_batch": nfe,  # the most any batch used, summed over its repeats
                "dequantization": "uniform, x = 2(k + u)/256 - 1",
                "offset_bits_per_dim": 7.0,  # log2(256 / 2): the density of [-1, 1] data on the integer grid
            }
        if self.autoencode:
            scalars.update(self.reconstruction_metrics(params))
            protocol["reconstructions"] = {
                "split": e.split, "num_examples": len(self._data()[0]), "latent": "the posterior mean",
                "psnr_ssim": "per image on [-1, 1] (data range 2), averaged; SSIM: 11x11 Gaussian window, sigma 1.5, "
                             "smaller for images under 11 pixels (metrics.image_quality)",
            }
        elif any(m in self.metrics for m in (*INCEPTION_METRICS, "digits")):
            values, sample_protocol = self.sample_metrics(params, jax.random.fold_in(key, 2))
            scalars.update(values)
            _, options = sampler_from_config(config.sample, self.learn_sigma)
            sample_protocol["sampler"] = {"name": config.sample.sampler,
                                          **{k: v for k, v in options.items() if not callable(v)}}
            for name in ("guidance_scale", "classifier_workdir", "classifier_scale", "batch_size"):
                if config.sample.get(name) is not None:
                    sample_protocol["sampler"][name] = config.sample[name]
            protocol["samples"] = sample_protocol
        return {"step": step, "metrics": scalars, "protocol": protocol}


def prompt_targets(prompts: tuple[str, ...] | None, batch_size: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The digit [n] and property levels [n, P] (-1/0/+1) that the captions of `n` samples asked for
    (`sampling.sample_prompts`, batch after batch; read back with `captions.parse_caption`)."""
    parsed = [captions.parse_caption(p) for p in sample_prompts(prompts, batch_size)]
    if any(label is None for label, _ in parsed):
        raise ConfigError("sample.prompts: the digits metric needs prompts that name a digit")
    labels = np.array([label for label, _ in parsed], np.int32)
    requested = np.array(
        [[{captions.LEVELS[p][0]: -1, captions.LEVELS[p][1]: 1}.get(found.get(p), 0) for p in captions.PROPERTIES]
         for _, found in parsed], np.int8,
    )
    reps = -(-n // batch_size)
    return np.tile(labels, reps)[:n], np.tile(requested, (reps, 1))[:n]


SWEEP_METRICS = ("fid", "digits_fid", "vlb_bpd", "ode_bpd")  # lower is better; the default order of preference


def ema_sweep(
    evaluator: Evaluator, state: TrainState, step: int, sigma_rels: tuple[float, ...], metric: str | None
) -> dict[str, Any]:
    """EDM2's σ_rel sweep (§3.2): every metric for the post-hoc EMA of each σ_rel (rebuilt from the run's snapshots
    at `step`), and the best by `metric` (lower is better; None: the first of `SWEEP_METRICS` computed). Returns the
    best one's results with `best_ema_sigma_rel` among its metrics and the whole sweep in the protocol."""
    runs = []
    for sigma_rel in sigma_rels:
        results = evaluator(state, step, ema_sigma_rel=sigma_rel)
        if metric is None:
            metric = next((m for m in SWEEP_METRICS if m in results["metrics"]), None)
        if metric not in results["metrics"]:
            raise ConfigError(f"eval.ema_sweep_metric: {metric!r} is not among the metrics computed "
                              f"({sorted(results['metrics'])}); name one of them (lower is better)")
        logging.info("σ_rel %g: %s", sigma_rel, ", ".join(f"{k} {v:.4g}" for k, v in results["metrics"].items()))
        runs.append((sigma_rel, results))
    sweep = {"metric": metric, "lower_is_better": True, "results": {str(s): dict(r["metrics"]) for s, r in runs}}
    best_sigma_rel, best = min(runs, key=lambda run: run[1]["metrics"][metric])
    best["metrics"]["best_ema_sigma_rel"] = best_sigma_rel
    best["protocol"]["ema_sweep"] = sweep
    return best


def write_results(workdir: str | Path, results: dict[str, Any], writer: MetricWriter) -> Path:
    """`<workdir>/eval/eval_<step>.json` and the `eval/<name>` scalars in metrics.jsonl / TensorBoard."""
    step = results["step"]
    path = Path(workdir) / "eval" / f"eval_{step}.json"
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    writer.write_scalars(step, {f"eval/{k}": v for k, v in results["metrics"].items()})
    return path


def evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
    """Eval mode: `config.eval.metrics` for the newest checkpoint (or `eval.checkpoint_step`) of `workdir`.

    A workdir without that checkpoint is a ConfigError naming the field.
    """
    latent.adopt_saved_scale_factor(config, workdir)  # a latent run's, as training computed it
    exp = experiment.build(config)
    evaluator = Evaluator(config, exp, workdir)
    checkpointer = Checkpointer(Path(workdir) / "checkpoints")
    try:
        wanted = config.eval.get("checkpoint_step")
        abstract = exp.abstract_state
        if wanted is None:
            state = experiment.restore_or_pretrained(config, exp, checkpointer)
        else:
            steps = checkpointer.all_steps()
            if wanted not in steps:
                raise ConfigError(f"eval.checkpoint_step: no checkpoint {wanted} in {checkpointer.directory}; "
                                  f"it has {sorted(steps) or 'none'}")
            state = checkpointer.restore_step(wanted, abstract)
    finally:
        checkpointer.close()
    step = int(state.step)
    logging.info("Evaluating %s at step %d", ", ".join(evaluator.metrics), step)
    sweep = tuple(config.eval.get("ema_sigma_rels") or ())
    results = ema_sweep(evaluator, state, step, sweep, config.eval.get("ema_sweep_metric")) if sweep else evaluator(
        state, step)
    writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
    try:
        path = write_results(workdir, results, writer)
    finally:
        writer.close()
    logging.info("Step %d: %s (wrote %s)", step,
                 ", ".join(f"{k} {v:.4g}" for k, v in results["metrics"].items()), path)
    return results
