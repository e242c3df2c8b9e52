"""The training losses of LDM's KL autoencoder: reconstruction, KL, and a PatchGAN with an adaptive weight.

Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models"
(arXiv 2112.10752), Appendix G, train the autoencoder (models/autoencoder.py) on

    L_G = L_rec + kl_weight * L_KL + disc_factor(step) * d_weight * L_adv,

LDM's `LPIPSWithDiscriminator` (ldm/modules/losses/contperceptual.py), built on VQGAN's loss
(Esser et al. 2021, "Taming Transformers for High-Resolution Image Synthesis", arXiv
2012.09841, §3.1, eq. (5)-(7)):

- L_rec: |x - x~| (l1; l2 offered) plus, in LDM, a perceptual LPIPS term (Zhang et al. 2018).
  LDM reduces it as sum over pixels, mean over the batch (`torch.sum(nll_loss) / B`).
  LDM divides it by exp(logvar) and adds logvar for a scalar `logvar` initialised at 0,
  but that scalar is in neither of LDM's optimisers (`configure_optimizers` of
  ldm/models/autoencoder.py), so it stays 0 and the term is L_rec itself; it is left out.
- L_KL: KL(q(z|x) || N(0, I)) summed over latent dims, mean over the batch; kl_weight 1e-6.
- L_adv = -mean(D(x~)), the generator's hinge loss against the PatchGAN discriminator
  D (models/discriminator.py), which is trained on the hinge loss of `hinge_d_loss`.
- d_weight = disc_weight * ||grad_{W_L} L_rec|| / (||grad_{W_L} L_adv|| + 1e-4), clipped and
  not differentiated: Esser et al.'s adaptive weight, eq. (7), with W_L the kernel of the
  decoder's last layer (`decoder.conv_out.kernel`). It scales the GAN gradient at the
  decoder's output to the size of the reconstruction gradient.
- disc_factor(step) = 0 before `disc_start` (LDM's `adopt_weight`): the autoencoder first
  learns to reconstruct, then the adversarial term switches on (LDM's KL-f8: step 50001).

Offline configuration: no perceptual loss. LPIPS needs a VGG-16 trunk and LPIPS's linear
heads, whose weights are a download; with none available offline the loss here is the
pixel loss only (`perceptual_weight` 0 in LDM's terms), which is what the offline config
uses. LDM weights LPIPS by 1.0 in L_rec; it can be added later as another term of L_rec,
loading both weight files from a local path (not implemented here).

Mapping LDM's config (configs/autoencoder/autoencoder_kl_*.yaml, `lossconfig.params`) to
these arguments: kl_weight -> kl_weight (1e-6); disc_start -> disc_start; LDM's
disc_factor (1.0) * disc_weight (0.5) -> disc_weight here (0.5), the whole factor of the
adversarial term after disc_start; LDM's disc_factor -> `discriminator_loss(disc_factor=)`.
With `pixel_reduction='sum'` (the default) L_rec is LDM's; 'mean' averages over pixels
instead, which makes the loss independent of the image size but multiplies the relative
weight of the KL by H*W*C (rescale kl_weight accordingly).

Everything here is a pure function of arrays and `nnx.State`s, so the train step can take
`jax.value_and_grad` of `autoencoder_loss` with respect to the autoencoder's parameters and
of `discriminator_loss` with respect to the discriminator's.
"""

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_jax.models.autoencoder import DiagonalGaussian

LAST_LAYER = ("decoder", "conv_out", "kernel")  # W_L of Esser et al. eq. (7): the decoder's last conv kernel
Discriminator = tuple[nnx.GraphDef, nnx.State]  # (graphdef, params) of a PatchDiscriminator


def reconstruction_loss(
    x: jax.Array,
    x_rec: jax.Array,
    kind: Literal["l1", "l2"] = "l1",
    *,
    reduction: Literal["mean", "sum"] = "mean",
) -> jax.Array:
    """Per-example pixel loss: |x - x_rec| ('l1', LDM) or (x - x_rec)^2 ('l2') over the non-batch axes -> [B].

    `reduction='mean'` averages over pixels and channels (the default); 'sum' sums them, LDM's
    reduction (Rombach et al. 2022, `LPIPSWithDiscriminator`: torch.sum(rec_loss) / B).
    Computed in float32.

    Raises:
        ValueError: for another kind or reduction, or shapes that differ.
    """
    if x.shape != x_rec.shape:
        raise ValueError(f"x_rec: expected the shape of x {x.shape}, got {x_rec.shape}")
    diff = x.astype(jnp.float32) - x_rec.astype(jnp.float32)
    if kind == "l1":
        err = jnp.abs(diff)
    elif kind == "l2":
        err = jnp.square(diff)
    else:
        raise ValueError(f"kind: must be 'l1' or 'l2', got {kind!r}")
    axes = tuple(range(1, x.ndim))
    if reduction == "mean":
        return jnp.mean(err, axis=axes)
    if reduction == "sum":
        return jnp.sum(err, axis=axes)
    raise ValueError(f"reduction: must be 'mean' or 'sum', got {reduction!r}")


def kl_loss(posterior: DiagonalGaussian) -> jax.Array:
    """L_KL = sum_b KL(q(z|x_b) || N(0, I)) / B, a scalar.

    LDM's normalisation (`kl_loss = torch.sum(posteriors.kl()) / B`): the KL is summed over
    all latent dimensions of an example (not averaged) and averaged over the batch, so it
    grows with the latent size; kl_weight = 1e-6 of LDM's configs is calibrated for this.
    """
    return jnp.mean(posterior.kl().astype(jnp.float32))


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """The discriminator's hinge loss: 0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(x~)))).

    Lim & Ye 2017 (Geometric GAN), as taming's and LDM's `hinge_d_loss`; means over all logits
    (batch and patches).
    """
    loss_real = jnp.mean(jax.nn.relu(1.0 - logits_real.astype(jnp.float32)))
    loss_fake = jnp.mean(jax.nn.relu(1.0 + logits_fake.astype(jnp.float32)))
    return 0.5 * (loss_real + loss_fake)


def vanilla_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """The non-saturating GAN's discriminator loss: 0.5 * (mean(softplus(-D(x))) + mean(softplus(D(x~)))).

    Goodfellow et al. 2014, eq. (1) with sigmoid logits; taming's and LDM's `vanilla_d_loss`.
    """
    loss_real = jnp.mean(jax.nn.softplus(-logits_real.astype(jnp.float32)))
    loss_fake = jnp.mean(jax.nn.softplus(logits_fake.astype(jnp.float32)))
    return 0.5 * (loss_real + loss_fake)


D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def generator_adversarial_loss(logits_fake: jax.Array) -> jax.Array:
    """L_adv = -mean(D(x~)) over batch and patches (taming's and LDM's generator loss)."""
    return -jnp.mean(logits_fake.astype(jnp.float32))


def _global_norm(tree: Any) -> jax.Array:
    """The 2-norm of all entries of an array or pytree of arrays (torch.norm of a flattened tensor)."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(leaf.astype(jnp.float32))) for leaf in jax.tree.leaves(tree)))


def adaptive_weight(
    grad_rec_last_layer: Any,
    grad_gan_last_layer: Any,
    max_weight: float = 1e4,
    eps: float = 1e-4,
) -> jax.Array:
    """lambda = ||grad_{W_L} L_rec|| / (||grad_{W_L} L_adv|| + eps), clipped to [0, max_weight], no gradient.

    Esser et al. 2021, eq. (7) (taming's and LDM's `calculate_adaptive_weight`, which also clip
    to [0, 1e4] and detach it); W_L is the decoder's last layer. The gradients are arrays (or
    pytrees of arrays, normed as one vector). The result is not multiplied by disc_weight.
    """
    weight = _global_norm(grad_rec_last_layer) / (_global_norm(grad_gan_last_layer) + eps)
    return jax.lax.stop_gradient(jnp.clip(weight, 0.0, max_weight))


def adopt_weight(weight: float | jax.Array, step: int | jax.Array, threshold: int) -> jax.Array:
    """`weight` from step `threshold` on, 0 before it (LDM's and taming's `adopt_weight`); `step` may be traced."""
    return jnp.where(jnp.asarray(step) >= threshold, jnp.asarray(weight, jnp.float32), 0.0)


def _images(batch: Mapping[str, jax.Array] | jax.Array) -> jax.Array:
    """The images of a data batch ({'image': [B, H, W, C], ...}, DESIGN §4) or an image array itself."""
    if isinstance(batch, Mapping):
        if "image" not in batch:
            raise ValueError(f"batch: expected an 'image' entry [B, H, W, C], got keys {sorted(batch)}")
        return batch["image"]
    return batch


def _is_path(path: Sequence[Any], names: Sequence[str]) -> bool:
    """Whether a pytree key path of an nnx.State names the parameter `names` (a trailing `.value` is ignored)."""
    keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    return tuple(map(str, keys)) == tuple(names)


def _get_param(params: nnx.State, names: Sequence[str]) -> jax.Array:
    found = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params) if _is_path(path, names)]
    if len(found) != 1:
        raise ValueError(
            f"params: expected one parameter {'.'.join(names)} (the decoder's last layer), found {len(found)}"
        )
    return found[0]


def _replace_param(params: nnx.State, names: Sequence[str], value: jax.Array) -> nnx.State:
    return jax.tree_util.tree_map_with_path(lambda path, leaf: value if _is_path(path, names) else leaf, params)


def reconstruct(
    params: nnx.State, graphdef: nnx.GraphDef, x: jax.Array, key: jax.Array | None, *, sample_posterior: bool = True
) -> tuple[jax.Array, DiagonalGaussian]:
    """(x~ [B, H, W, C], q(z|x)) from the autoencoder `nnx.merge(graphdef, params)`; z ~ q(z|x) drawn with `key`."""
    model = nnx.merge(graphdef, params)
    return model(x, key=key, sample_posterior=sample_posterior)


def autoencoder_loss(
    params: nnx.State,
    graphdef: nnx.GraphDef,
    batch: Mapping[str, jax.Array] | jax.Array,
    key: jax.Array,
    discriminator: Discriminator | None,
    step: int | jax.Array,
    *,
    kl_weight: float = 1e-6,
    disc_start: int = 0,
    disc_weight: float = 0.5,
    rec_kind: Literal["l1", "l2"] = "l1",
    pixel_reduction: Literal["sum", "mean"] = "sum",
    sample_posterior: bool = True,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The autoencoder's (generator's) loss L_rec + kl_weight * L_KL + disc_factor(step) * d_weight * L_adv.

    Rombach et al. 2022, Appendix G (LDM's `LPIPSWithDiscriminator`, optimizer_idx 0, without
    LPIPS: see the module docstring); d_weight is Esser et al. 2021's adaptive weight, eq. (7),
    from the gradients of L_rec and L_adv with respect to `decoder.conv_out.kernel`. Those two
    gradients come from one forward pass linearised in that kernel only (`jax.vjp`), so they
    cost a backward pass through the discriminator and the last conv, not through the decoder.

    Differentiate with respect to `params` (argument 0); the discriminator's parameters are
    constants here (its gradient comes from `discriminator_loss`), and d_weight is not
    differentiated (stop_gradient, as LDM's `.detach()`).

    Args:
        params: the autoencoder's parameters (`nnx.split(model, nnx.Param)[1]` of an AutoencoderKL).
        graphdef: its graph definition.
        batch: {'image': [B, H, W, C] in [-1, 1], ...} (or the image array).
        key: draws z ~ q(z|x) (unused when `sample_posterior` is False).
        discriminator: (graphdef, params) of a PatchDiscriminator, or None for no adversarial
            term: then the loss is L_rec + kl_weight * L_KL and g_adv, d_weight, disc_factor are 0.
        step: the training step (may be traced); the adversarial term is on from `disc_start`.
        kl_weight: weight of L_KL (LDM: 1e-6).
        disc_start: first step of the adversarial term (LDM's discriminator_iter_start).
        disc_weight: factor of the adversarial term from disc_start on (LDM's disc_factor *
            disc_weight = 1.0 * 0.5).
        rec_kind: 'l1' (LDM) or 'l2'.
        pixel_reduction: 'sum' over pixels (LDM) or 'mean' (see the module docstring).
        sample_posterior: decode a sample of q(z|x) (LDM's training) or its mean.

    Returns:
        (loss [], aux) with aux = {'rec': L_rec, 'kl': L_KL, 'g_adv': L_adv, 'd_weight': the
        adaptive weight (before disc_weight), 'disc_factor': disc_factor(step)}, scalars such
        that loss = rec + kl_weight * kl + disc_factor * d_weight * g_adv, and 'reconstruction' x~
        [B, H, W, C] (for the discriminator's loss, which LDM computes on a second forward pass).
    """
    x = _images(batch)

    if discriminator is None:
        x_rec, posterior = reconstruct(params, graphdef, x, key, sample_posterior=sample_posterior)
        rec = jnp.mean(reconstruction_loss(x, x_rec, rec_kind, reduction=pixel_reduction))
        kl = kl_loss(posterior)
        zero = jnp.zeros((), jnp.float32)
        aux = {"rec": rec, "kl": kl, "g_adv": zero, "d_weight": zero, "disc_factor": zero, "reconstruction": x_rec}
        return rec + kl_weight * kl, aux

    disc_graphdef, disc_params = discriminator

    def forward(last_kernel: jax.Array) -> tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
        """(L_rec, L_adv) as functions of the decoder's last kernel, with (L_KL, x~) as aux."""
        x_rec, posterior = reconstruct(
            _replace_param(params, LAST_LAYER, last_kernel), graphdef, x, key, sample_posterior=sample_posterior
        )
        rec = jnp.mean(reconstruction_loss(x, x_rec, rec_kind, reduction=pixel_reduction))
        logits_fake = nnx.merge(disc_graphdef, disc_params)(x_rec)  # [B, h, w, 1]
        return (rec, generator_adversarial_loss(logits_fake)), (kl_loss(posterior), x_rec)

    (rec, g_adv), pullback, (kl, x_rec) = jax.vjp(forward, _get_param(params, LAST_LAYER), has_aux=True)
    one, zero = jnp.ones_like(rec), jnp.zeros_like(rec)
    (grad_rec,) = pullback((one, zero))  # d L_rec / d W_L
    (grad_gan,) = pullback((zero, one))  # d L_adv / d W_L
    d_weight = adaptive_weight(grad_rec, grad_gan)
    disc_factor = adopt_weight(disc_weight, step, disc_start)
    loss = rec + kl_weight * kl + disc_factor * d_weight * g_adv
    aux = {"rec": rec, "kl": kl, "g_adv": g_adv, "d_weight": d_weight, "disc_factor": disc_factor,
           "reconstruction": x_rec}
    return loss, aux


def discriminator_loss(
    disc_params: nnx.State,
    disc_graphdef: nnx.GraphDef,
    x: jax.Array,
    x_rec: jax.Array,
    step: int | jax.Array,
    *,
    disc_start: int = 0,
    disc_factor: float = 1.0,
    loss: Literal["hinge", "vanilla"] = "hinge",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The discriminator's loss disc_factor(step) * hinge(D(x), D(x~)) (LDM's optimizer_idx 1).

    Rombach et al. 2022, Appendix G; Esser et al. 2021, §3.1. `x_rec` are reconstructions
    of `x` (e.g. from `reconstruct`, or the generator step's); they are constants here
    (stop_gradient, as LDM's `.detach()`). Differentiate with respect to `disc_params`.

    Args:
        disc_params: the PatchDiscriminator's parameters.
        disc_graphdef: its graph definition.
        x: real images [B, H, W, C] (or a data batch with an 'image' entry).
        x_rec: their reconstructions [B, H, W, C].
        step: the training step (may be traced); the loss is 0 before `disc_start`.
        disc_start: first step the discriminator trains (the generator's disc_start).
        disc_factor: the factor from disc_start on (LDM's disc_factor, 1.0).
        loss: 'hinge' (LDM's default) or 'vanilla'.

    Returns:
        (loss [], aux) with aux = {'d_loss': the unweighted loss, 'logits_real': mean D(x),
        'logits_fake': mean D(x~), 'disc_factor': disc_factor(step)}.
    """
    if loss not in D_LOSSES:
        raise ValueError(f"loss: must be one of {sorted(D_LOSSES)}, got {loss!r}")
    x = _images(x)
    disc = nnx.merge(disc_graphdef, disc_params)
    logits_real = disc(jax.lax.stop_gradient(x))  # [B, h, w, 1]
    logits_fake = disc(jax.lax.stop_gradient(x_rec))
    d_loss = D_LOSSES[loss](logits_real, logits_fake)
    factor = adopt_weight(disc_factor, step, disc_start)
    aux = {
        "d_loss": d_loss,
        "logits_real": jnp.mean(logits_real.astype(jnp.float32)),
        "logits_fake": jnp.mean(logits_fake.astype(jnp.float32)),
        "disc_factor": factor,
    }
    return factor * d_loss, aux
