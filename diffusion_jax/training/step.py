"""The train step: a pure function of (state, batch), written once for every mesh."""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from diffusion_jax import classifier_loss, diffusion, guidance, vlb
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
    images (`classifier_loss.noisy_classifier_loss`; metrics then include `accuracy`). Under
    A class-conditional model (`model.num_classes`) sees the null label in place of each label with
    probability `training.label_dropout` (classifier-free guidance's joint training). Under
    `jax.jit` with the batch sharded over the mesh, XLA inserts the gradient all-reduce, so the same
    step runs on 1 or N devices (no shard_map, hence none of its pmean-after-grad
    trap, shared/notes/stack-2026-11.md).
    """
    classify = config.training.get("objective", "denoise") == "classify"
    class_conditional = config.model.get("num_classes") is not None and not classify
    label_dropout = config.training.get("label_dropout", 0.0) if class_conditional else 0.0
    decays = tuple(config.training.ema_decays)
    loss_name = config.diffusion.get("loss", "simple")
    prediction = config.diffusion.prediction

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        loss_key, dropout_key = jax.random.split(jax.random.fold_in(state.key, state.step))
        cond = batch["label"] if class_conditional else None
        if label_dropout > 0:  # classifier-free guidance's unconditional model: the null label num_classes
            label_key = jax.random.fold_in(loss_key, 1)  # loss_key itself is split inside the loss
            cond = guidance.drop_labels(label_key, cond, label_dropout, config.model.num_classes)

        def loss_fn(params: nnx.State) -> tuple[jax.Array, dict[str, jax.Array]]:
            def model_fn(x_t: jax.Array, t: jax.Array) -> jax.Array:
                return model_apply(graphdef, params, x_t, t, cond, train=True, dropout_key=dropout_key)

            if classify:  # model_fn returns logits [B, K]; the labels are the targets
                images, labels = batch["image"], batch["label"]
                return classifier_loss.noisy_classifier_loss(model_fn, schedule, images, labels, loss_key)
            if loss_name == "hybrid":
                return vlb.hybrid_loss(
                    model_fn, schedule, batch["image"], loss_key, prediction=prediction,
                    vlb_weight=config.diffusion.vlb_weight,
                )
            if loss_name == "vlb":
                return vlb.vlb_loss(
                    model_fn, schedule, batch["image"], loss_key, prediction=prediction,
                    history=state.timestep_history,
                )
            return diffusion.simple_loss(
                model_fn,
                schedule,
                batch["image"],
                loss_key,
                prediction=prediction,
                weighting=config.diffusion.loss_weighting,
                min_snr_gamma=config.diffusion.min_snr_gamma,
            )

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
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
        if "vlb" in aux:  # one-sample L_t, bits/dim: its mean over t is L_vlb / T less the prior
            metrics["vlb_term"] = jnp.mean(aux["vlb"])
        return new_state, metrics

    return train_step
