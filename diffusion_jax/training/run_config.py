"""The config a run was trained with, kept with its checkpoints, and what a resume changes.

Every checkpoint holds the resolved config it was saved with (`Checkpointer.save`). On
resume the current config is compared with the checkpoint's: the differences are logged
as one block and appended to `<workdir>/config_history.jsonl`; a difference in a field
that changes what the state means or its shapes (`PROTECTED`: the model, the diffusion
process, the objective, the data it models) stops the run before anything compiles,
unless the user passes `--allow_config_change`. `config.json` is rewritten (atomically)
at every start, so it always describes the run that last started.
"""

import json
import os
import time
from pathlib import Path
from typing import Any

import ml_collections
from absl import logging

from diffusion_jax.errors import ConfigError

HISTORY_FILE = "config_history.jsonl"
CONFIG_FILE = "config.json"

# Fields (or whole sections) whose change makes the checkpoint's state mean something else.
PROTECTED = (
    "model", "diffusion", "training.objective", "training.ema_decays", "training.ema_sigma_rels", "optim.name",
    "data.name", "data.image_size", "latent.autoencoder_workdir", "latent.scale_factor", "distill", "consistency",
    "flow", "vdm",
)

Changes = dict[str, tuple[Any, Any]]  # dotted field -> (checkpoint's value, this run's value)

_MISSING = "<absent>"


def as_json(config: ml_collections.ConfigDict) -> dict:
    """The config as the JSON a checkpoint stores (tuples become lists, placeholders None)."""
    return json.loads(config.to_json_best_effort())


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out |= _flatten(value, f"{prefix}{key}.")
        return out
    return {prefix[:-1]: tree}


def diff(saved: dict, current: dict) -> Changes:
    """The fields whose values differ between two JSON configs, as (saved, current); a field one side lacks and
    the other leaves None (a field newer than the checkpoint) is no difference."""
    old, new = _flatten(saved), _flatten(current)
    unset = (_MISSING, None)  # a field added to the codebase since the checkpoint, left unset: no change
    return {
        key: (old.get(key, _MISSING), new.get(key, _MISSING))
        for key in sorted(old.keys() | new.keys())
        if old.get(key, _MISSING) != new.get(key, _MISSING)
        and not {old.get(key, _MISSING), new.get(key, _MISSING)} <= set(unset)
    }


def with_defaults(saved: dict) -> dict:
    """A checkpoint's JSON config with the fields added to `base_config` since it was written set to their
    defaults (a wave-1 run is `diffusion.process='discrete'` without saying so), its own values kept. `model`
    is kept whole: its fields are one model's constructor arguments, not defaults of every model."""
    from diffusion_jax.config import base_config  # config builds on nothing here; this keeps it that way

    def merge(default: Any, value: Any) -> Any:
        if not (isinstance(default, dict) and isinstance(value, dict)):
            return value
        return default | {k: merge(default.get(k), v) for k, v in value.items()}

    defaults = as_json(base_config())
    defaults.pop("model", None)
    return merge(defaults, saved)


def is_protected(field: str) -> bool:
    return any(field == p or field.startswith(p + ".") for p in PROTECTED)


def check_resume(changes: Changes, step: int, allow_change: bool) -> None:
    """Refuses (one line) a resume that changes a `PROTECTED` field, unless `allow_change`."""
    protected = {k: v for k, v in changes.items() if is_protected(k)}
    if protected and not allow_change:
        shown = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in list(protected.items())[:4])
        more = f" and {len(protected) - 4} more" if len(protected) > 4 else ""
        raise ConfigError(
            f"--workdir: this run changes what the checkpoint of step {step} was trained as ({shown}{more}); "
            "use a new --workdir, or pass --allow_config_change to resume with it anyway"
        )


def record_resume(workdir: Path, changes: Changes, step: int) -> None:
    """Logs the changes as one block and appends them to `config_history.jsonl` (nothing if none)."""
    if not changes:
        return
    lines = "\n".join(f"  {k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())
    logging.info("Resuming from step %d with %d config change(s) from the checkpoint's config:\n%s",
                 step, len(changes), lines)
    entry = {"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
             "changes": {k: {"from": old, "to": new} for k, (old, new) in changes.items()}}
    with open(workdir / HISTORY_FILE, "a") as f:
        f.write(json.dumps(entry) + "\n")


def write_config_file(workdir: Path, config: ml_collections.ConfigDict) -> None:
    """Writes `config.json` atomically (a broken or stale one is replaced, with a warning if broken)."""
    path = workdir / CONFIG_FILE
    if path.exists():
        try:
            json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            logging.warning("%s was not valid JSON; rewritten from this run's config", path)
    temporary = path.with_name(f".{CONFIG_FILE}.{os.getpid()}")
    temporary.write_text(config.to_json_best_effort(indent=2))
    os.replace(temporary, path)
