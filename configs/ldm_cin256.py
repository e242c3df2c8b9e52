"""LDM-4 on class-conditional ImageNet 256x256 with Rombach et al. 2022's settings (arXiv 2112.10752v2).

NOT RUNNABLE OFFLINE. The paper's reported model (Table 3 and Table 10: LDM-4-G, FID 3.60, IS 247.67
± 5.59, precision 0.87, recall 0.48, 400M parameters, 250 DDIM steps with classifier-free guidance
s = 1.5; without guidance FID 10.56, IS 103.49; 50k samples against the training set, E.3.1) is the
released `cin256-v2` model of CompVis/latent-diffusion (configs/latent-diffusion/cin256-v2.yaml; its
notebook scripts/latent_imagenet_diffusion.ipynb logs "DiffusionWrapper has 400.92 M params").
Its first stage is a VQ autoencoder, NOT a KL one: VQ-f4 (VQModelInterface, embed_dim 3, 8192 codes,
ch 128, ch_mult (1, 2, 4), 2 res blocks, no attention; models/first_stage_models/vq-f4/config.yaml;
Table 8: R-FID 0.58), trained on OpenImages. The repository has no KL-based cin256 model (its other
ImageNet config, cin-ldm-vq-f8.yaml, is the VQ-f8 LDM-8 of Table 10). The diffusion model runs on
the continuous pre-quantisation latents h = quant_conv(E(x)) of 256x256 images, 64x64x3 (f = 4),
unscaled (LatentDiffusion's default scale_factor 1.0: "the VQ-regularized space has a variance
close to 1, such that it does not have to be rescaled", Appendix D.1); decoding quantises first.

What is missing to run it: (1) this codebase trains only the KL first stage (training.objective=
'autoencode', models.autoencoder.AutoencoderKL, loaded by models.first_stage.FirstStage), so
`latent.autoencoder_workdir` must hold a first-stage run it cannot produce, and the VQ-f4 weights
(a download) are not here; (2) ImageNet (`data.name='imagenet2012'`) must be placed by hand for tfds
and prepared (`python -m diffusion_jax.data.prepare`), and its ~1.28M images reach a latent run through
the latent cache (`python -m diffusion_jax.data.encode_latents`); the pipeline centre-crops where LDM
takes a random crop (below). Building the config stops at (1), with the one-line error naming
`latent.autoencoder_workdir`. A KL stand-in of the
same latent shape would be LDM's kl-f4 (models/first_stage_models/kl-f4/config.yaml: an
`autoencoder_kl` run with block_out_channels=(128, 256, 512), layers_per_block=2, latent_channels=3,
kl_weight 1e-6, disc_start 50001, disc_weight 0.5; Table 8: R-FID 0.27), with `latent.scale_factor
=None` (1/std of the first batch, as LDM does for KL latents): not the paper's model.

The U-Net (Table 15, "Class-Label-to-Image"; cin256-v2.yaml unet_config): ch 192, multipliers
(1, 2, 3, 5), 2 res blocks, LDM's SpatialTransformer (transformer depth 1, context 512) at latent
resolutions 32, 16, 8 and in the middle, 1 head, no dropout, no scale-shift norm, conv resampling.
Built here it has 400,920,579 parameters without its label table, LDM's 400.92M exactly. Table 15
prints 395M for the same model; Tables 3 and 10 and the code say 400M.

The class condition differs. LDM feeds the label through cross-attention: a learned ClassEmbedder
(nn.Embedding(1001, 512), row 1000 the null class of guidance) gives a 1-token context [B, 1, 512],
trained jointly. Here the class enters the codebase's ADM way: `model.num_classes` adds a label
embedding (1001 x 768, +768,768 parameters) to the time embedding, and `training.label_dropout`
swaps in the null label. The SpatialTransformers' cross-attention (26.7M parameters) is built but
sits idle: it runs only when a batch carries a precomputed `context` [B, L, 512] (e.g. the rows of
LDM's ClassEmbedder), and no ImageNet pipeline here supplies one. The label-dropout rate of the
guided model is given by neither the paper nor the repository (whose ClassEmbedder drops nothing);
0.1 is Ho & Salimans' and DiT's.

The diffusion: T = 1000, eps-prediction, L_simple (l2). LDM's "linear" schedule is linear in sqrt(beta)
from 0.0015 to 0.0195 (cin256-v2.yaml linear_start/linear_end; ldm/modules/diffusionmodules/util.py
make_beta_schedule). The codebase's 'scaled_linear' is the same form but with Stable Diffusion's
0.00085 -> 0.012, and `build_schedule` passes no endpoints, so the schedule here is NOT LDM cin's:
alpha-bar_T is 4.7e-3 instead of 1.4e-4 (mean |Δ log-SNR| 1.4 over t). Training: AdamW (torch
defaults: weight decay 0.01, betas (0.9, 0.999), eps 1e-8; LatentDiffusion.configure_optimizers),
lr 1e-4 constant (Table 15; base_learning_rate 1e-4, not scaled by the batch), no warmup, no gradient
clipping, batch 1200, 178K steps, no EMA (cin256-v2.yaml: use_ema False). Images: the shorter side
resized to 256 and a random 256 crop (ldm/data/imagenet.py via taming's ImagePaths), no flips.
Sampling: DDIM, 250 steps, eta 0 (DDIMSampler's default; the paper does not state eta), no x_0
clipping in latent space, guidance s = 1.5 (LDM's e_u + s (e_c - e_u), the codebase's s = 1 + w).
LDM's DDIM steps are 1, 5, ..., 997 (make_ddim_timesteps' +1); 'uniform' here gives 0, 4, ..., 996.
"""

import ml_collections

from diffusion_jax.config import base_config


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    config.data.update(name="imagenet2012", image_size=256, random_flip=False)
    # The VQ-f4 first stage of the paper (see above); a workdir this codebase cannot produce.
    config.latent.update(autoencoder_workdir="runs/vq_f4_openimages", scale_factor=1.0)
    config.model.update(
        name="unet",
        ch=192,
        ch_mult=(1, 2, 3, 5),
        num_res_blocks=2,
        attn_resolutions=(32, 16, 8),
        dropout=0.0,
        num_heads=1,
        num_head_channels=None,
        use_scale_shift_norm=False,
        resblock_updown=False,
        num_classes=1000,
        learn_sigma=False,
        context_dim=512,
        transformer_depth=1,
    )
    # LDM's sqrt-linear form; its 0.0015 -> 0.0195 endpoints cannot be set here (see above).
    config.diffusion.update(
        schedule="scaled_linear", num_timesteps=1000, prediction="eps", loss="simple", loss_weighting="none"
    )
    config.optim.update(
        name="adamw",
        learning_rate=1e-4,
        weight_decay=0.01,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        warmup_steps=0,
        schedule="constant",
        grad_clip_norm=0.0,
    )
    config.training.update(
        batch_size=1200,
        num_steps=178_000,
        ema_decays=(),
        label_dropout=0.1,
        checkpoint_every=10_000,
        sample_every=20_000,
    )
    config.sample.update(
        sampler="ddim",
        steps=250,
        eta=0.0,
        spacing="uniform",
        guidance_scale=1.5,
        ema_decay=None,
        clip_x0=None,
    )
    config.eval.update(metrics=("fid", "inception_score"), num_samples=50_000, reference_split="train")
    return config
