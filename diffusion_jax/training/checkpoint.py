"""Orbax checkpoints of the train state, with the resolved config saved beside it."""

from pathlib import Path

import jax
import ml_collections
import orbax.checkpoint as ocp

from diffusion_jax.errors import ConfigError
from diffusion_jax.training.state import TrainState


class Checkpointer:
    """Async orbax checkpoints in `<workdir>/checkpoints/<step>/{state,config}`.

    The data position is the step itself (batches are a pure function of
    (seed, step)), so the state plus the config is all a run needs to resume.
    A save that was killed midway leaves `<step>.orbax-checkpoint-tmp`, which
    orbax ignores: restore always picks the newest *complete* step.
    """

    def __init__(self, directory: str | Path, max_to_keep: int | None = None):
        self.directory = Path(directory).absolute()
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=True, create=True),
            item_names=("state", "config"),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: TrainState, config: ml_collections.ConfigDict) -> None:
        """Starts an async save of step `step`; returns once the arrays are copied."""
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config.to_dict())
            ),
        )

    def restore(self, abstract_state: TrainState, step: int | None = None) -> TrainState:
        """Restores `step` (default: the newest) into the shapes and shardings of `abstract_state`.

        `abstract_state` holds `jax.ShapeDtypeStruct`s with the *current* shardings,
        so a checkpoint restores onto whatever mesh this run has.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise ConfigError(f"--workdir: no checkpoint in {self.directory}; train first with --mode=train")
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
            )
        except (ValueError, KeyError) as e:
            raise ConfigError(
                f"--workdir: the checkpoint at step {step} in {self.directory} does not match this config's "
                f"model/optimizer (config.model, config.optim, config.training.ema_decays): {e}"
            ) from e
        return restored.state

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def abstract_like(state: TrainState, sharding: jax.sharding.Sharding) -> TrainState:
    """ShapeDtypeStructs of `state` (arrays or abstract values) placed with `sharding`."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)
