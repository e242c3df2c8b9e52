"""The train step: a pure function of (state, batch), written once for every mesh."""

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh

from diffusion_jax import conditioning, controlnet, objectives, super_resolution
from diffusion_jax.errors import ConfigError
from diffusion_jax.training import shard_step
from diffusion_jax.training.mesh import SEQUENCE_AXIS
from diffusion_jax.training.state import TrainState, ema_betas, update_emas

Batch = dict[str, jax.Array]  # {'image': [B, ...] float32 in [-1, 1], 'label': [B] int32}
Frozen = dict[str, Any] | None  # an objective's frozen arrays (`objectives.Objective.frozen`)


def make_train_step(
    graphdef: nnx.GraphDef,
    objective: objectives.Objective,
    tx: optax.GradientTransformation,
    lr_schedule: optax.Schedule,
    config: ml_collections.ConfigDict,
    mesh: Mesh | None = None,
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """Returns `train_step(state, batch, frozen=None) -> (state, metrics)`, not yet jitted.

    The loss is `objective`'s (`objectives.build`: the table of `training.objective`), which the
    step differentiates without knowing which it is: the diffusion loss of `diffusion.loss`, the
    noise-aware classifier's, the first stage's, a distillation loss. The network's condition
    (`batch_condition`) is the batch's labels for a class-conditional model (`model.num_classes`), and
    its token or context entries (`diffusion_jax.conditioning`) when it has them; a conditional model
    sees the whole null condition instead with probability `training.label_dropout` (classifier-free
    guidance's joint training; `conditioning.drop`). Under `jax.jit` with the batch sharded over the
    mesh, XLA inserts the gradient all-reduce (or, with FSDP-sharded parameters, the all-gathers and
    reduce-scatters), so the same step runs on every mesh (no shard_map, hence none of its
    pmean-after-grad trap, shared/notes/stack-2026-11.md). With `training.grad_accum_steps` = k > 1
    the batch is split into k microbatches whose gradients are averaged in a `lax.scan` (activation
    memory of one microbatch; one optimiser update). With `diffusion.timestep_sampling='importance'`
    the state's `timestep_history` takes the step's per-example L_t (aux 't', 'vlb').

    `training.step_impl='shard_map'` computes the loss and gradients per device over `mesh` and all-reduces
    them by hand (`shard_step.all_reduced`; the same numbers, a place for per-device logic); the rest of the
    step is this one.

    `frozen` is the objective's frozen arrays (`Objective.frozen`, e.g. REPA's encoder); None: the objective's
    own, closed over. Pass them as an argument to the jitted step (`experiment.jit_train_step` does): closed
    over, XLA embeds them in the program as constants.
    """
    class_conditional = config.model.get("num_classes") is not None and objective.conditions_model
    conditional = (class_conditional or _uses_text(config)) and objective.conditions_model
    cond_dropout = config.training.get("label_dropout", 0.0) if conditional else 0.0
    null_label = config.model.get("num_classes")  # the null label's index
    betas = ema_betas(config.training)
    accum_steps = config.training.get("grad_accum_steps", 1)

    def loss_and_grads(
        params: nnx.State, state: TrainState, frozen: Frozen, images: jax.Array, labels: jax.Array,
        cond: conditioning.Cond, noise: jax.Array | None, key: jax.Array,
    ) -> tuple[tuple[jax.Array, dict[str, jax.Array]], nnx.State]:
        """((loss, aux), d loss / d params) of one (micro)batch; `key` draws its t, noise and dropout."""
        loss_key, dropout_key = jax.random.split(key)
        inputs = objectives.LossInputs(images, labels, cond, loss_key, dropout_key, noise, frozen=frozen)
        return jax.value_and_grad(objective.loss, has_aux=True)(params, state, inputs)

    def compute_grads(
        params: nnx.State, state: TrainState, frozen: Frozen, images: jax.Array, labels: jax.Array,
        cond: conditioning.Cond, noise: jax.Array | None, key: jax.Array,
    ) -> tuple[tuple[jax.Array, dict[str, jax.Array]], nnx.State]:
        """((loss, aux), grads) of the batch: one pass, or the mean over `training.grad_accum_steps` microbatches."""
        grads_fn = functools.partial(loss_and_grads, params, state, frozen)
        if accum_steps == 1:
            return grads_fn(images, labels, cond, noise, key)
        return _accumulate(grads_fn, params, (images, labels, cond, noise), key, accum_steps)

    if config.training.get("step_impl", "jit") == "shard_map":
        if mesh is None:
            raise ConfigError("training.step_impl: 'shard_map' needs the mesh; pass make_train_step(..., mesh)")
        if mesh.shape.get(SEQUENCE_AXIS, 1) > 1:  # XLA refuses ring attention's shard_map nested in this one
            raise ConfigError(f"training.step_impl: 'shard_map' cannot nest the ring attention of "
                              f"mesh.sequence={mesh.shape[SEQUENCE_AXIS]}; use 'jit' (the default) with it")
        compute_grads = shard_step.all_reduced(compute_grads, mesh, config.training.get("shard_map_rng", "global"))

    def train_step(state: TrainState, batch: Batch, frozen: Frozen = None) -> tuple[TrainState, dict[str, jax.Array]]:
        frozen = objective.frozen if frozen is None else frozen
        if objective.advance is not None:  # e.g. a new distillation round: the teacher, EMAs, optimiser
            state = objective.advance(state, tx)
        step_key = jax.random.fold_in(state.key, state.step)
        images, labels = batch["image"], batch["label"]
        cond = batch_condition(batch, class_conditional)
        cond = super_resolution.training_condition(config, cond, images, jax.random.fold_in(step_key, 2))  # SR3/CDM
        if cond_dropout > 0:  # classifier-free guidance's unconditional model: the null condition
            cond = conditioning.drop(jax.random.fold_in(step_key, 1), cond, cond_dropout, null_label)
        cond = controlnet.training_condition(config, cond, images, jax.random.fold_in(step_key, 3))  # never dropped
        noise = batch.get("noise")  # reflow's paired noise (`flow.pairs_dir`), else None: drawn by the loss
        (loss, aux), grads = compute_grads(state.params, state, frozen, images, labels, cond, noise, step_key)
        grad_norm = optax.global_norm(grads)

        def update(state: TrainState) -> TrainState:
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            emas = update_emas(state.ema_params, params, betas(state.step + 1))
            updated = state.replace(params=params, ema_params=emas, opt_state=opt_state)
            if state.timestep_history is not None:
                updated = updated.replace(timestep_history=state.timestep_history.update(aux["t"], aux["vlb"]))
            return updated

        # A non-finite loss or gradient drops the whole update: params, EMAs and optimiser
        # state stay as they were, and the step still advances (the loop decides, from
        # training.on_nonfinite, whether to go on). A `cond`, not a per-leaf `where(finite, new, old)`:
        # the select kept the old state alive beside the new one, so XLA copied every donated
        # parameter and optimiser buffer (490 copies per small U-Net step; benchmarks/README.md).
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new_state = jax.lax.cond(finite, update, lambda state: state, state)
        new_state = new_state.replace(
            step=state.step + 1, skipped_steps=state.skipped_steps + jnp.where(finite, 0, 1).astype(jnp.int32)
        )
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "learning_rate": lr_schedule(state.step),
            "nonfinite": (~finite).astype(jnp.int32),
        }
        return new_state, metrics | {k: aux[k] for k in objective.metrics}

    return train_step


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
