"""The train step: a pure function of (state, batch), written once for every mesh."""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from diffusion_jax import autoencoder_loss, classifier_loss, conditioning, diffusion, vlb
from diffusion_jax.metrics import image_quality
from diffusion_jax.schedules import Schedule
from diffusion_jax.training.setup import model_apply
from diffusion_jax.training.state import TrainState, update_emas

Batch = dict[str, jax.Array]  # {'image': [B, ...] float32 in [-1, 1], 'label': [B] int32}


def make_train_step(
    graphdef: nnx.GraphDef,
    schedule: Schedule,
    tx: optax.GradientTransformation,
    lr_schedule: optax.Schedule,
    config: ml_collections.ConfigDict,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """Returns `train_step(state, batch) -> (state, metrics)`, not yet jitted.

    The loss is `diffusion.simple_loss` on the global batch (`diffusion.loss='simple'`), improved
    DDPM's `vlb.hybrid_loss` ('hybrid') or `vlb.vlb_loss` ('vlb', with `diffusion.timestep_sampling=
    'importance'` drawing t from the state's `timestep_history`, which the step then updates), or with
    `training.objective='classify'` the noise-aware classifier's cross-entropy on noised
    images (`classifier_loss.noisy_classifier_loss`; metrics then include `accuracy`).
    The network's condition (`batch_condition`) is the batch's labels for a class-conditional model
    (`model.num_classes`), and its token or context entries (`diffusion_jax.conditioning`) when it has
    them; a conditional model sees the whole null condition instead with probability
    `training.label_dropout` (classifier-free guidance's joint training; `conditioning.drop`). Under
    `jax.jit` with the batch sharded over the mesh, XLA inserts the gradient all-reduce (or, with
    FSDP-sharded parameters, the all-gathers and reduce-scatters), so the same step runs on every
    mesh (no shard_map, hence none of its pmean-after-grad trap, shared/notes/stack-2026-11.md).
    With `training.grad_accum_steps` = k > 1 the batch is split into k microbatches whose gradients
    are averaged in a `lax.scan` (activation memory of one microbatch; one optimiser update).
    """
    classify = config.training.get("objective", "denoise") == "classify"
    autoencode = config.training.get("objective", "denoise") == "autoencode"
    first_stage_options = dict(config.get("autoencode", {}))
    class_conditional = config.model.get("num_classes") is not None
    conditional = (class_conditional or _uses_text(config)) and not classify
    cond_dropout = config.training.get("label_dropout", 0.0) if conditional else 0.0
    null_label = config.model.get("num_classes")  # the null label's index
    decays = tuple(config.training.ema_decays)
    accum_steps = config.training.get("grad_accum_steps", 1)
    loss_name = config.diffusion.get("loss", "simple")
    prediction = config.diffusion.prediction

    def loss_and_grads(
        params: nnx.State,
        history: vlb.TimestepHistory | None,
        step: jax.Array,
        images: jax.Array,
        labels: jax.Array,
        cond: conditioning.Cond,
        key: jax.Array,
    ) -> tuple[tuple[jax.Array, dict[str, jax.Array]], nnx.State]:
        """((loss, aux), d loss / d params) of one (micro)batch; `key` draws its t, noise and dropout."""
        loss_key, dropout_key = jax.random.split(key)

        def loss_fn(params: nnx.State) -> tuple[jax.Array, dict[str, jax.Array]]:
            if autoencode:  # LDM's first stage: the autoencoder's and the discriminator's losses
                return first_stage_loss(graphdef, params, images, loss_key, step, first_stage_options)

            def model_fn(x_t: jax.Array, t: jax.Array) -> jax.Array:
                return model_apply(graphdef, params, x_t, t, cond, train=True, dropout_key=dropout_key)

            if classify:  # model_fn returns logits [B, K]; the labels are the targets
                return classifier_loss.noisy_classifier_loss(model_fn, schedule, images, labels, loss_key)
            if loss_name == "hybrid":
                return vlb.hybrid_loss(
                    model_fn, schedule, images, loss_key, prediction=prediction, vlb_weight=config.diffusion.vlb_weight
                )
            if loss_name == "vlb":
                return vlb.vlb_loss(
                    model_fn, schedule, images, loss_key, prediction=prediction, history=history
                )
            return diffusion.simple_loss(
                model_fn,
                schedule,
                images,
                loss_key,
                prediction=prediction,
                weighting=config.diffusion.loss_weighting,
                min_snr_gamma=config.diffusion.min_snr_gamma,
            )

        return jax.value_and_grad(loss_fn, has_aux=True)(params)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        step_key = jax.random.fold_in(state.key, state.step)
        images, labels = batch["image"], batch["label"]
        cond = batch_condition(batch, class_conditional and not classify)
        if cond_dropout > 0:  # classifier-free guidance's unconditional model: the null condition
            cond = conditioning.drop(jax.random.fold_in(step_key, 1), cond, cond_dropout, null_label)
        grads_fn = functools.partial(loss_and_grads, state.params, state.timestep_history, state.step)
        if accum_steps == 1:
            (loss, aux), grads = grads_fn(images, labels, cond, step_key)
        else:
            (loss, aux), grads = _accumulate(grads_fn, state.params, (images, labels, cond), step_key, accum_steps)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        updated = state.replace(
            params=params, ema_params=update_emas(state.ema_params, params, decays), opt_state=opt_state
        )
        if state.timestep_history is not None:
            updated = updated.replace(timestep_history=state.timestep_history.update(aux["t"], aux["vlb"]))
        # A non-finite loss or gradient drops the whole update: params, EMAs and optimiser
        # state stay as they were, and the step still advances (the loop decides, from
        # training.on_nonfinite, whether to go on).
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated, state)
        new_state = new_state.replace(
            step=state.step + 1, skipped_steps=state.skipped_steps + jnp.where(finite, 0, 1).astype(jnp.int32)
        )
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "learning_rate": lr_schedule(state.step),
            "nonfinite": (~finite).astype(jnp.int32),
        }
        if classify:
            metrics["accuracy"] = aux["accuracy"]
        if autoencode:
            metrics |= {k: aux[k] for k in FIRST_STAGE_METRICS}
        if "vlb" in aux:  # one-sample L_t, bits/dim: its mean over t is L_vlb / T less the prior
            metrics["vlb_term"] = jnp.mean(aux["vlb"])
        return new_state, metrics

    return train_step


FIRST_STAGE_METRICS = ("rec", "kl", "g_adv", "d_weight", "d_loss", "psnr")


def first_stage_loss(
    graphdef: nnx.GraphDef, params: nnx.State, images: jax.Array, key: jax.Array, step: jax.Array, options: dict
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """LDM's first-stage objective (Appendix G) on a `models.FirstStage`: the autoencoder's loss
    L_rec + kl_weight L_KL + disc_factor d_weight L_adv (`autoencoder_loss.autoencoder_loss`) plus the
    patch discriminator's hinge loss (`autoencoder_loss.discriminator_loss`) on a fresh reconstruction.

    The two are summed with stop-gradients across (the discriminator is a constant in the first, the
    reconstruction in the second), so one gradient of the sum is each loss's gradient in its own
    parameters. `options` are `config.autoencode`: kl_weight, disc_start, disc_weight, rec_kind,
    pixel_reduction.
    """
    model = nnx.merge(graphdef, params)
    ae_graphdef, ae_params = nnx.split(model.autoencoder)
    gen_key, disc_key = jax.random.split(key)
    discriminator = None
    if model.discriminator is not None:
        disc_graphdef, disc_params = nnx.split(model.discriminator)
        discriminator = (disc_graphdef, jax.lax.stop_gradient(disc_params))
    loss, aux = autoencoder_loss.autoencoder_loss(
        ae_params, ae_graphdef, images, gen_key, discriminator, step,
        **{k: options[k] for k in ("kl_weight", "disc_start", "disc_weight", "rec_kind", "pixel_reduction")
           if k in options},
    )
    x_rec, _ = autoencoder_loss.reconstruct(jax.lax.stop_gradient(ae_params), ae_graphdef, images, disc_key)
    aux["psnr"] = jnp.mean(image_quality.psnr(images, jnp.clip(x_rec, -1.0, 1.0)))
    aux["d_loss"] = jnp.zeros(())
    if model.discriminator is not None:
        d_loss, d_aux = autoencoder_loss.discriminator_loss(
            disc_params, disc_graphdef, images, x_rec, step, disc_start=options.get("disc_start", 0)
        )
        loss, aux["d_loss"] = loss + d_loss, d_aux["d_loss"]
    return loss, aux


def _uses_text(config: ml_collections.ConfigDict) -> bool:
    return config.model.get("context_dim") is not None or config.model.get("text_encoder") is not None


def batch_condition(batch: Batch, class_conditional: bool) -> conditioning.Cond:
    """The network's condition from a batch: its labels (if `class_conditional`) and whichever of the
    token, context and pooled entries of `conditioning.KEYS` it holds. Labels alone stay a bare [B]
    array (`conditioning`'s shorthand), so a class-conditional run's condition is what it always was."""
    cond = {k: batch[k] for k in conditioning.KEYS if k != "label" and k in batch}
    if not cond:
        return batch["label"] if class_conditional else None
    return cond | ({"label": batch["label"]} if class_conditional else {})


def _accumulate(
    grads_fn: Callable, params: nnx.State, batch: tuple, key: jax.Array, k: int
) -> tuple[tuple[jax.Array, dict[str, jax.Array]], nnx.State]:
    """The mean loss, aux and gradients of `grads_fn(*microbatch, key_i)` over k microbatches of `batch`
    (a tuple of arrays [B, ...], dicts of them, or None).

    Microbatch i holds rows i, i + k, i + 2k, ...: a [B/k, k] reshape then a transpose, so each
    microbatch is spread over all the devices that the batch is (a [k, B/k] reshape would put
    microbatch i on the i-th k-th of the devices). Microbatch i draws its noise with
    fold_in(key, i). Per-example aux arrays come back in the batch's order.
    """

    def split(x: jax.Array) -> jax.Array:
        return x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)

    def body(grad_sum: nnx.State, xs: tuple) -> tuple[nnx.State, tuple]:
        i, micro = xs
        (loss, aux), grads = grads_fn(*micro, jax.random.fold_in(key, i))
        return jax.tree.map(jnp.add, grad_sum, grads), (loss, aux)

    micro = jax.tree.map(split, batch)  # conditions may be None, an array or a dict
    zeros = jax.tree.map(jnp.zeros_like, params)  # the gradients have the parameters' tree and dtypes
    grad_sum, (losses, aux) = jax.lax.scan(body, zeros, (jnp.arange(k), micro))
    merged = jax.tree.map(lambda a: a.mean(0) if a.ndim == 1 else a.swapaxes(0, 1).reshape(-1, *a.shape[2:]), aux)
    return (losses.mean(), merged), jax.tree.map(lambda g: g / k, grad_sum)
