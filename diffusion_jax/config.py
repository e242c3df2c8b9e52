"""The base experiment config; every file in `configs/` starts from it.

Fields (each overridable from the command line, e.g. `--config.training.batch_size=8`):

- `seed`: model init, data order, noise and sampling all derive from it.
- `mesh` (see `diffusion_jax.training.mesh`): the sizes of the axes `data`, `fsdp`, `sequence` and `tensor`
  (-1: the devices left over; default all devices on `data`, pure data parallelism; `sequence` > 1 splits a
  DiT's tokens and every self-attention over that many devices, ring attention, `models.ring_attention`);
  `param_rules`, (regex, placement) pairs matched against parameter paths, placement 'replicate', 'fsdp'
  (split the largest divisible dimension over 'fsdp') or a PartitionSpec tuple;
  `fsdp_min_size` (parameters with fewer elements stay replicated).
- `data`: `name` (digits | cifar10 | swiss_roll | eight_gaussians | two_moons), `image_size`,
  `data_dir` (tfds data dir; None: tfds's default), `random_flip`.
- `data.captions` (digits only): batches also hold `tokens`/`token_mask`, a caption per image from its label
  and measured thickness and slant (`diffusion_jax.data.captions`).
- `model`: `name` (unet | mlp | dit | ...) and that model's constructor arguments; `pretrained` (a PyTorch /
  diffusers checkpoint the run starts from, imported by `diffusion_jax.convert`; None: the initialiser); the
  U-Net's and the DiT's conditioning (`diffusion_jax.conditioning`): `num_classes`, `context_dim`
  (cross-attention to `cond['context']`: every attention block becomes LDM's SpatialTransformer,
  `transformer_depth` blocks deep), `pooled_dim`, and
  `text_encoder` (a dict of `width`, `depth`, `num_heads`; a transformer over `cond['tokens']` trained jointly,
  whose vocabulary comes from `data.captions`); `low_res_size` (the U-Net as a super-resolution model, SR3: it is
  conditioned on `cond['low_res']`, the image area-downsampled to this size, which must divide `data.image_size`;
  None: off; `diffusion_jax.super_resolution`).
- `diffusion`: `schedule` (linear | cosine | scaled_linear | sigmoid), `num_timesteps`,
  `prediction` (eps | x0 | v), `loss_weighting` (none | snr | truncated_snr | snr_plus_one | min_snr), `min_snr_gamma`,
  `loss` ('simple': Ho et al.'s L_simple; 'hybrid': improved DDPM's L_simple + vlb_weight * L_vlb; 'vlb': L_vlb
  alone; both need `model.learn_sigma=True`), `vlb_weight` (lambda, 0.001), `timestep_sampling` ('uniform' |
  'importance': improved DDPM §3.3's p_t ∝ sqrt(E[L_t^2]), for loss='vlb'), `process` ('discrete': the schedule
  above, model time = the timestep index; 'flow': the linear interpolant (1 - t) x_0 + t ε of flow matching,
  model time t, prediction 'velocity' (ε - x_0); 'edm': EDM's x + σ n with model time σ in [`sigma_min`, `sigma_max`]
  and the network wrapped in `preconditioning` ('edm': Karras et al. Table 1; 'consistency': its σ_min-shifted
  form, f(x, σ_min) = x exactly) with `sigma_data`; `models.Preconditioned`); 'vdm': VDM's variance-preserving
  process of a learned γ (`vdm` below), model time t ∈ [0, 1], prediction 'eps'), `p_mean`, `p_std` (EDM
  training's lognormal σ, `training.objective='edm'`).
- `optim`: `name` (adam | adamw), `learning_rate`, `warmup_steps`, `schedule` (constant | cosine | linear),
  `grad_clip_norm` (0: off), `b1`, `b2`, `eps`, `weight_decay`.
- `training`: `batch_size` (global), `num_steps`, `log_every`, `checkpoint_every`, `sample_every`,
  `keep_checkpoints`, `ema_decays` (one EMA per decay), `ema_sigma_rels` (EDM2's power-function EMAs, one per
  relative width σ_rel in (0, 0.2887), whose length grows with training; EDM2 tracks (0.05, 0.1)),
  `ema_snapshot_every` (write the power EMAs to <workdir>/ema_snapshots/ every so many steps and at the last,
  from which `sample.ema_sigma_rel` and `eval.ema_sigma_rels` rebuild any σ_rel post hoc; 0: off),
  `on_nonfinite` ('stop': exit non-zero at a non-finite loss or gradient, keeping the last good checkpoint;
  'skip': drop that step's update),
  `on_checkpoint_error` (a checkpoint that cannot be written: disk full, permission, quota; 'stop': exit 1
  with one line naming the step, the space it needed and had, and the newest intact step; 'retry': log that
  line, train on and try again at the next checkpoint interval), `lock_stale_after_s` (the workdir lock of
  a run on another host whose heartbeat is older than this is taken over; on this host a dead pid is enough),
  `objective` (`diffusion_jax.objectives`: 'denoise': the diffusion loss; 'edm': EDM's denoising loss on
  `diffusion.process='edm'`; 'flow_matching': flow matching / rectified flow (`flow` below); 'meanflow':
  MeanFlow's average velocity for one-step sampling (`meanflow` below); 'vdm': VDM's continuous VLB with its
  learned schedule on `diffusion.process='vdm'` (`vdm` below); 'consistency':
  consistency distillation or training (`consistency` below); 'distill': progressive distillation (`distill`
  below); 'autoencode': LDM's first stage (`autoencode` below); 'classify': train a noise-aware classifier
  (`model.name='classifier'`) with the cross-entropy of its logits on noised images, for classifier guidance),
  `label_dropout` (conditional models: the probability of training on the whole null condition (null label,
  empty caption; `conditioning.drop`) instead, which
  makes the same network the unconditional model of classifier-free guidance; 0.1 as DiT), `grad_accum_steps`
  (microbatches whose gradients make one update; `batch_size` stays the global batch), `peak_flops` (FLOP/s
  of one device, for the model-FLOPs utilisation in the logs; None: measured with a matmul at start; 0: off),
  `compilation_cache_dir` (JAX's persistent compilation cache, shared by runs; None: off), `low_res_noise_max`
  (a super-resolution run, `model.low_res_size`: CDM's noise-conditioning augmentation, each example's low-res
  image noised at a level s ~ U[0, low_res_noise_max] of the run's own forward process, s = 1 its whole length,
  and the model told s; 0: SR3's clean conditioning), `step_impl` ('jit': one jitted step, XLA inserts the
  gradient all-reduce; 'shard_map': each device's loss and gradient under `jax.shard_map`, averaged by an
  explicit `pmean` after `grad`, `training.shard_step`), `shard_map_rng` (the 'shard_map' step's draws:
  'global', each device's rows of the jit step's draws, the same run; 'per_device', independent streams).
- `latent` (`diffusion_jax.latent`): `autoencoder_workdir` (a `training.objective='autoencode'` run: the
  model is trained and sampled on s * z, z ~ q(z|x) of its frozen autoencoder; None: pixel space),
  `scale_factor` s (None: LDM's 1/std of the first batch's latents, then stored with the run),
  `sample_posterior`, `cache_dir` (latents written once by `python -m diffusion_jax.data.encode_latents`,
  read instead of encoding every batch; `data.latent_cache`; None: encode on the fly).
- `distill` (`training.objective='distill'`: progressive distillation, `distill.progressive`):
  `teacher_workdir` (a trained diffusion run with this config's `model` and schedule; its `sample.ema_decay`
  parameters), `teacher_steps` (the DDIM steps the first teacher takes, a power of two; round r's student
  takes teacher_steps / 2^(r+1), sampled with `sample.spacing='trailing'`), `rounds`, `steps_per_round`
  (`training.num_steps` ≤ rounds × steps_per_round), `weighting` ('truncated_snr' | 'snr_plus_one').
- `flow` (`training.objective='flow_matching'`, `diffusion.process='flow'`, `diffusion.prediction='velocity'`;
  `diffusion_jax.flow`): `t_sampling` ('uniform' | 'logit_normal' with `logit_mean`, `logit_std`: SD3's
  rf/lognorm(0, 1)), `pairs_dir` (reflow: train on the (noise, sample) pairs that
  `python -m diffusion_jax.reflow` drew from a trained flow, instead of independent noise; None: off),
  `init_workdir` (a flow run of this `model` whose sampling EMA this run starts from: reflow's next flow).
- `meanflow` (`training.objective='meanflow'`, `diffusion.process='flow'`, `diffusion.prediction='velocity'`;
  `diffusion_jax.meanflow`; its (t, r) are drawn by `flow.t_sampling`, `logit_mean`, `logit_std`: the paper's
  ImageNet lognorm(-0.4, 1), CIFAR-10 lognorm(-2, 2)): `interval_ratio` (the fraction of examples with r < t;
  the others are flow matching at r = t; ImageNet 0.25, CIFAR-10 0.75), `adaptive_p`, `adaptive_c` (the loss
  weight 1 / (mse + c)^p, ImageNet p = 1, CIFAR-10 0.75; p = 0: plain), `time_scale` (the backbone's time input
  is time_scale × (t, t - r); 10, not flow matching's 1000, whose ∂_t u made training diverge; see
  `models.Preconditioned`). Sample with `sample.sampler='meanflow'`
  (`sample.steps` jumps; 1: one-step generation) or any flow sampler (the instantaneous velocity, r = t).
- `repa` (`diffusion_jax.repa`; REPA, Yu et al. 2024): `weight` λ of the alignment loss added to a 'denoise',
  'edm' or 'flow_matching' objective (0: off; the paper's 0.5), `encoder` (the frozen encoder of the clean
  images: 'digits', the digits classifier's last conv map; 'dinov2', DINOv2's patch tokens, `models.dinov2`),
  `encoder_path` ('dinov2': a Hugging Face facebook/dinov2-* model.safetensors, or its folder with config.json),
  `encoder_resolution` ('dinov2': the images are resized to it, a multiple of the patch size 14; REPA's 224),
  `layer` (the backbone's tap: a U-Net's down level k, or len(ch_mult) + 1 its middle block; a DiT's block k;
  the backbone then holds the trainable projector).
- `vdm` (`training.objective='vdm'`, `diffusion.process='vdm'`; `diffusion_jax.vdm`, `models.VDMNetwork`):
  `gamma_min`, `gamma_max` (γ's initial endpoints, learned from there; the network's time input is γ scaled
  by them), `gamma_hidden` (width of γ's monotonic network, App. H: 1024), `fourier` ((n_min, n_max) of the
  input's sin/cos(2^n π z) features, §3.4, (6, 7) as google-research/vdm; (): none), `decoder` ('discrete':
  8-bit pixels, a softmax over the 256 levels; 'gaussian': continuous data such as latents).
- `consistency` (`training.objective='consistency'`, `diffusion.process='edm'` with
  `diffusion.preconditioning='consistency'`; `distill.consistency`): `teacher_workdir` (consistency distillation
  from this diffusion run's probability-flow ODE, one Heun step per level; None: consistency training),
  `num_levels` N of the Karras grid (ρ = `rho`) with `curriculum` 'fixed', or 'ict' (N doubles from `s0` to
  `s1` over `training.num_steps`), `level_sampling` ('uniform' | 'lognormal' with `p_mean`, `p_std`),
  `weighting` ('uniform' | 'inverse_gap'), `distance` ('l2' | 'pseudo_huber'), `target_ema_decay` (which of
  `training.ema_decays` is the target network θ⁻; None: θ under stop_gradient, as iCT).
- `autoencode` (`training.objective='autoencode'`, `model.name='autoencoder_kl'`; `autoencoder_loss`):
  `kl_weight` (LDM 1e-6), `disc_start`, `disc_weight`, `rec_kind` ('l1' | 'l2'), `pixel_reduction`.
- `controlnet` (`model.name='controlnet_unet'`, `models.controlnet`; `diffusion_jax.controlnet`): ControlNet
  (Zhang et al. 2023): `base_workdir` (a trained diffusion run of this `model` less its control fields
  `control_channels`, `hint_channels`, on this schedule: its `sample.ema_decay` parameters become the frozen
  base and the initial trainable copy of its encoder), `control` (the control image made from each batch:
  'edges', the thresholded Sobel gradient magnitude, or 'mask', the digit's coarse mask).
- `inverse` (sample mode; `diffusion_jax.inverse`): a linear inverse problem solved with the unconditional model,
  y = A x_0 + `noise_std` n of the images `image` ('test': the test split's; or an image file), `operator` A
  ('mask': the known pixels of `mask`, 'box' | 'half' | 'strokes' | an image file; 'blur': a Gaussian of
  `blur_size` taps and `blur_std` pixels; 'downsample': f × f means, f = `factor`; None: off), sampled by `method`
  ('tweedie': Gaussian conditioning with Tweedie's covariance, exact for Gaussian data, `cg_steps` CG iterations;
  'pigdm': ΠGDM; 'dps': DPS with step ζ = `scale`; `scale` multiplies the others' correction).
- `sample`: `sampler` (ddpm | ddim | dpm_solver++ | euler | heun | pc | langevin | ode | consistency |
  meanflow), `steps` (None: the sampler's default), `num_samples`, `batch_size`, `ema_decay` (which EMA; None: raw
  params),
  `ema_sigma_rel` (instead: the power EMA of this σ_rel, tracked in training or, in sample and eval mode and
  `diffusion_jax.load`, rebuilt post hoc from the run's snapshots at the checkpoint's step), `png_scale`, and
  the sampler's own options, None meaning the sampler's default (see `diffusion_jax.samplers`): `eta`,
  `variance`, `spacing`, `clip_x0` (ddpm, ddim, dpm_solver++, euler, heun, pc); `order`,
  `lower_order_final`, `max_step_ratio` (dpm_solver++); `rho`, `s_churn`, `s_tmin`, `s_tmax`, `s_noise`
  (euler, heun); `predictor`, `corrector`, `snr`, `n_corrector` (pc); `n_steps_each`, `step_lr`,
  `denoise_final` (langevin, ode); `ode_solver`, `rtol`, `atol`, `max_steps` (ode); `sigmas` (chosen model
  times, noisiest first), `sigma_min` (consistency); `guidance_scale` s for
  classifier-free guidance of class-conditional models (s = 1 + w of Ho & Salimans; None or 1: none);
  `prompts` (text-conditional models: the captions sampled, cycled; None: digits captions cycling 0-9
  and thick / thin / leaning right / leaning left); `guidance_channels` (None: guide the prediction's every
  channel and keep a learned variance conditional; 3: DiT's guidance of the first three latent channels);
  `classifier_workdir` (the workdir of a `training.objective='classify'` run: its config.json and newest
  checkpoint give the classifier) and `classifier_scale` s for classifier guidance (Dhariwal & Nichol
  2021: p(x) p(y | x)^s; 1: the class-conditional distribution), Algorithm 1 under the 'ddpm' sampler and
  Algorithm 2 under the others. `guide_workdir` (a weaker run of the same data, process and prediction: a
  smaller model, or the same one trained less; `guide_step` picks its checkpoint, None the newest) makes
  `guidance_scale` autoguidance (Karras et al. 2024) instead of classifier-free guidance.
  A ControlNet (`model.name='controlnet_unet'`) follows `control_image` (a .png, or
  a samples .npz whose arr_0 is uint8 [N, H, W, C_c], used as the control; None: the `controlnet.control`
  images of the test split's first digits). A super-resolution model (`model.low_res_size`) is conditioned on
  `low_res_image` (a .png or a samples .npz of low-res images; None: the test split's images area-downsampled),
  or with `low_res_workdir` on samples drawn from that stage-1 run (the cascade), at the augmentation level
  `low_res_noise` (s in [0, 1]; see `training.low_res_noise_max`); `low_res_consistency` projects each x̂_0 onto
  the low-res input (DDNM; with `low_res_noise` 0), so the area-downsampled output is the input.
  Editing (`diffusion_jax.editing`): inpainting of `inpaint_image` ('test': the test split's images, or an
  image file) where `inpaint_mask` (an image file, or 'box' | 'half' | 'strokes') is 0, by `inpaint_method`
  'replace' (score_sde's imputation), 'repaint' (RePaint: `repaint_jump`, `repaint_resamples`) or
  'conditional' (the conditional denoiser, `inpaint_cg_steps` CG iterations); SDEdit from `init_image` at
  `t0` in (0, 1] (None: 1), or with `invert` its DDIM inversion under `source_label` (None: the test images'
  labels) re-sampled under the sampled labels and guidance.
- `eval` (`--mode=eval`, and during training every `eval.every` steps; see `diffusion_jax.evaluate`):
  `metrics`, any of 'vlb_bpd' (the VLB in bits/dim, all T terms), 'ode_bpd' (probability-flow ODE bits/dim),
  'fid', 'inception_score', 'kid' (FID Inception; need `inception_weights`), 'digits' (digits-FID, IS analogue
  and, for class-conditional models, class accuracy, from the shipped digits classifier); `every` (0: only in
  eval mode), `checkpoint_step` (None: the newest), `split` and `num_examples` (None: all) and `batch_size` of
  the likelihood data, `seed`, `variance` of the VLB's reverse steps (None: 'learned_range' with
  model.learn_sigma, else sample.variance or 'fixed_small'), `clip_x0` of its x̂_0 (improved DDPM evaluates
  with 1.0); `ode_probe` (gaussian | rademacher), `ode_num_probes`, `ode_repeats` (dataset repeats with fresh
  dequantisation), `ode_solver`, `ode_rtol`, `ode_atol`; `vdm_time_samples` (a VDM's VLB: one-t estimates
  averaged per example); `num_samples` drawn with `config.sample` for the sample
  metrics, `inception_weights` (pytorch-fid's pt_inception-2015-12-05-6726825d.pth or its .npz conversion),
  `inception_batch_size`, `reference_stats` (an .npz with mu, sigma; None: computed from `reference_split` of the
  dataset and cached in <workdir>/eval/), `kid_subsets`, `kid_subset_size`; `ema_sigma_rels` (a sweep: every
  metric for the post-hoc EMA of each σ_rel, rebuilt from the run's snapshots, and the best by `ema_sweep_metric`,
  lower is better; None: the first of fid, digits_fid, vlb_bpd, ode_bpd computed; (): no sweep).
"""

import os

import ml_collections
from ml_collections.config_dict import placeholder


def base_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.mesh = ml_collections.ConfigDict(
        dict(data=-1, fsdp=1, sequence=1, tensor=1, param_rules=((".*", "fsdp"),), fsdp_min_size=2**12)
    )
    config.data = ml_collections.ConfigDict(
        dict(name="digits", image_size=16, data_dir=placeholder(str), random_flip=False)
    )
    config.model = ml_collections.ConfigDict(
        dict(
            name="unet",
            ch=128,
            ch_mult=(1, 2, 2, 2),
            num_res_blocks=2,
            attn_resolutions=(16,),
            dropout=0.1,
            num_heads=1,
            use_scale_shift_norm=False,
            resblock_updown=False,
            num_classes=placeholder(int),
            learn_sigma=False,
            pretrained=placeholder(str),
            low_res_size=placeholder(int),
        )
    )
    config.diffusion = ml_collections.ConfigDict(
        dict(
            schedule="linear",
            num_timesteps=1000,
            prediction="eps",
            loss_weighting="none",
            min_snr_gamma=5.0,
            loss="simple",
            vlb_weight=0.001,
            timestep_sampling="uniform",
            process="discrete",
            preconditioning="edm",
            sigma_min=0.002,
            sigma_max=80.0,
            sigma_data=0.5,
            p_mean=-1.2,
            p_std=1.2,
        )
    )
    config.optim = ml_collections.ConfigDict(
        dict(
            name="adam",
            learning_rate=2e-4,
            warmup_steps=5000,
            schedule="constant",
            grad_clip_norm=1.0,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            weight_decay=0.0,
        )
    )
    config.training = ml_collections.ConfigDict(
        dict(
            batch_size=128,
            num_steps=800_000,
            log_every=100,
            checkpoint_every=10_000,
            sample_every=50_000,
            keep_checkpoints=3,
            ema_decays=(0.9999,),
            ema_sigma_rels=(),
            ema_snapshot_every=0,
            on_nonfinite="stop",
            on_checkpoint_error="stop",
            lock_stale_after_s=900.0,
            objective="denoise",
            label_dropout=0.1,
            grad_accum_steps=1,
            step_impl="jit",
            shard_map_rng="global",
            peak_flops=placeholder(float),
            compilation_cache_dir="~/.cache/diffusion_jax/jax_cache",
            low_res_noise_max=0.0,
        )
    )
    config.latent = ml_collections.ConfigDict(
        dict(autoencoder_workdir=placeholder(str), scale_factor=placeholder(float), sample_posterior=True,
             cache_dir=placeholder(str))
    )
    config.distill = ml_collections.ConfigDict(
        dict(teacher_workdir=placeholder(str), teacher_steps=placeholder(int), rounds=placeholder(int),
             steps_per_round=placeholder(int), weighting="truncated_snr")
    )
    config.flow = ml_collections.ConfigDict(
        dict(t_sampling="logit_normal", logit_mean=0.0, logit_std=1.0, pairs_dir=placeholder(str),
             init_workdir=placeholder(str))
    )
    config.meanflow = ml_collections.ConfigDict(dict(interval_ratio=0.25, adaptive_p=1.0, adaptive_c=1e-3,
                                                      time_scale=10.0))
    config.repa = ml_collections.ConfigDict(dict(weight=0.0, encoder="digits", layer=placeholder(int),
                                                 encoder_path=placeholder(str), encoder_resolution=224))
    config.vdm = ml_collections.ConfigDict(
        dict(gamma_min=-13.3, gamma_max=5.0, gamma_hidden=1024, fourier=(6, 7), decoder="discrete")
    )
    config.consistency = ml_collections.ConfigDict(
        dict(teacher_workdir=placeholder(str), num_levels=18, curriculum="fixed", s0=10,
             s1=1280, level_sampling="uniform", p_mean=-1.1, p_std=2.0, weighting="uniform", distance="l2",
             target_ema_decay=placeholder(float), rho=7.0)
    )
    config.autoencode = ml_collections.ConfigDict(
        dict(kl_weight=1e-6, disc_start=0, disc_weight=0.5, rec_kind="l1", pixel_reduction="sum")
    )
    config.controlnet = ml_collections.ConfigDict(dict(base_workdir=placeholder(str), control="mask"))
    config.inverse = ml_collections.ConfigDict(
        dict(operator=placeholder(str), image="test", mask="box", blur_size=5, blur_std=1.0, factor=2,
             noise_std=0.05, method="tweedie", scale=1.0, cg_steps=8)
    )
    config.sample = ml_collections.ConfigDict(
        dict(
            sampler="ddpm",
            steps=placeholder(int),
            num_samples=64,
            batch_size=64,
            ema_decay=0.9999,
            ema_sigma_rel=placeholder(float),
            png_scale=1,
            eta=placeholder(float),
            variance=placeholder(str),
            spacing=placeholder(str),
            order=placeholder(int),
            lower_order_final=placeholder(bool),
            max_step_ratio=placeholder(float),
            clip_x0=1.0,
            guidance_scale=placeholder(float),
            guidance_channels=placeholder(int),
            classifier_workdir=placeholder(str),
            classifier_scale=1.0,
            guide_workdir=placeholder(str),
            guide_step=placeholder(int),
            rho=placeholder(float),
            s_churn=placeholder(float),
            s_tmin=placeholder(float),
            s_tmax=placeholder(float),
            s_noise=placeholder(float),
            predictor=placeholder(str),
            corrector=placeholder(str),
            snr=placeholder(float),
            n_corrector=placeholder(int),
            n_steps_each=placeholder(int),
            step_lr=placeholder(float),
            denoise_final=placeholder(bool),
            ode_solver=placeholder(str),
            rtol=placeholder(float),
            atol=placeholder(float),
            max_steps=placeholder(int),
            sigmas=placeholder(tuple),
            sigma_min=placeholder(float),
            low_res_image=placeholder(str),
            low_res_workdir=placeholder(str),
            low_res_noise=0.0,
            low_res_consistency=False,
            inpaint_image=placeholder(str),
            inpaint_mask=placeholder(str),
            inpaint_method="replace",
            repaint_jump=10,
            repaint_resamples=10,
            inpaint_cg_steps=8,
            init_image=placeholder(str),
            t0=placeholder(float),
            invert=False,
            source_label=placeholder(int),
            control_image=placeholder(str),
        )
    )
    config.eval = ml_collections.ConfigDict(
        dict(
            metrics=("vlb_bpd",),
            every=0,
            checkpoint_step=placeholder(int),
            split="test",
            num_examples=placeholder(int),
            batch_size=64,
            seed=0,
            variance=placeholder(str),
            clip_x0=1.0,
            ode_probe="rademacher",
            ode_num_probes=1,
            ode_repeats=1,
            ode_solver="tsit5",
            ode_rtol=1e-5,
            ode_atol=1e-5,
            vdm_time_samples=1,
            num_samples=50_000,
            inception_weights=placeholder(str),
            inception_batch_size=50,
            reference_stats=placeholder(str),
            reference_split="train",
            kid_subsets=100,
            kid_subset_size=1000,
            ema_sigma_rels=(),
            ema_sweep_metric=placeholder(str),
        )
    )
    return config


def config_from_file(path: str) -> ml_collections.ConfigDict:
    """`get_config()` of the config file at `path`, loaded by path as `--config=` loads it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def sibling_config(config_file: str, name: str) -> ml_collections.ConfigDict:
    """`get_config()` of the config file `name`.py beside `config_file`: a config that builds on another
    (configs are loaded by path, not imported as a package)."""
    return config_from_file(os.path.join(os.path.dirname(os.path.abspath(config_file)), f"{name}.py"))
