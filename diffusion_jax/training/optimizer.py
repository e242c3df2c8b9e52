"""The optimiser from `config.optim`: Adam/AdamW, linear warmup, grad-norm clipping."""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax

from diffusion_jax.errors import ConfigError

OPTIMIZERS = ("adam", "adamw")
LR_SCHEDULES = ("constant", "cosine", "linear")


def learning_rate_schedule(optim: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
    """Linear warmup from 0 over `optim.warmup_steps` (Ho et al. use 5000), then
    constant, or cosine or linear decay to 0 at `num_steps` (`optim.schedule`)."""
    warmup = optax.linear_schedule(0.0, optim.learning_rate, max(optim.warmup_steps, 1))
    decay_steps = max(num_steps - optim.warmup_steps, 1)
    if optim.schedule == "constant":
        after = optax.constant_schedule(optim.learning_rate)
    elif optim.schedule == "cosine":
        after = optax.cosine_decay_schedule(optim.learning_rate, decay_steps)
    elif optim.schedule == "linear":
        after = optax.linear_schedule(optim.learning_rate, 0.0, decay_steps)
    else:
        raise ConfigError(
            f"optim.schedule: unknown schedule {optim.schedule!r}; choose one of: {', '.join(LR_SCHEDULES)}"
        )
    return optax.join_schedules([warmup, after], [optim.warmup_steps])


def make_optimizer(
    optim: ml_collections.ConfigDict, num_steps: int, frozen: Sequence[str] = ()
) -> optax.GradientTransformation:
    """clip_by_global_norm(optim.grad_clip_norm) followed by Adam or AdamW, on every parameter but those under
    the top-level collections `frozen` (a ControlNet's 'base'), whose gradients are zeroed before the clipping
    norm and whose updates after AdamW's weight decay: they stay bit-identical. (Their Adam moments stay zero;
    optax's masks would save them but leave state trees that `mesh.state_shardings` cannot follow.)"""
    lr = learning_rate_schedule(optim, num_steps)
    if optim.name == "adam":
        opt = optax.adam(lr, b1=optim.b1, b2=optim.b2, eps=optim.eps)
    elif optim.name == "adamw":
        opt = optax.adamw(lr, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay)
    else:
        raise ConfigError(f"optim.name: unknown optimizer {optim.name!r}; choose one of: {', '.join(OPTIMIZERS)}")
    if optim.grad_clip_norm:
        opt = optax.chain(optax.clip_by_global_norm(optim.grad_clip_norm), opt)
    if not frozen:
        return opt

    def zero_frozen(updates: optax.Updates, params: optax.Params | None = None) -> optax.Updates:
        del params
        return jax.tree_util.tree_map_with_path(lambda path, u: jnp.zeros_like(u) if path[0].key in frozen else u,
                                                updates)

    return optax.chain(optax.stateless(zero_frozen), opt, optax.stateless(zero_frozen))
