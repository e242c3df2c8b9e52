"""Snapshots of a run's power-function EMAs and the post-hoc EMAs rebuilt from them (EDM2, arXiv 2312.02696, §3.2).

With `training.ema_sigma_rels` the train state keeps a power EMA per σ_rel (`posthoc_ema`); every
`training.ema_snapshot_every` steps and at the last step the training loop writes each of them to

    <workdir>/ema_snapshots/<step:08d>-<sigma_rel>.safetensors

(one flat tensor per parameter, named by its path, e.g. 'down/0/res/conv1/kernel'; the step, σ_rel and γ in the
file's metadata). Files are written whole or not at all (a temporary name, then a rename), so a crash or a full
disk leaves no partial snapshot. `reconstruct` rebuilds the EMA of any σ_rel at a snapshot step as the
least-squares combination of every snapshot up to it (`posthoc_ema.reconstruction_weights`).
"""

import os
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from diffusion_jax import distributed, posthoc_ema
from diffusion_jax.convert.mapping import param_paths
from diffusion_jax.errors import ConfigError

DIRECTORY = "ema_snapshots"


def power_ema_slots(config: ml_collections.ConfigDict) -> dict[float, int]:
    """{σ_rel: index into the train state's `ema_params`} of the run's power EMAs (after `training.ema_decays`)."""
    first = len(config.training.ema_decays)
    return {float(s): first + i for i, s in enumerate(config.training.get("ema_sigma_rels", ()))}


def write(workdir: str | Path, step: int, ema_params: tuple[nnx.State, ...], config: ml_collections.ConfigDict) -> None:
    """Writes the power EMAs of `ema_params` (the train state's) as step `step`'s snapshots. Every process calls it
    (gathering parameters sharded over processes is a collective); process 0 writes."""
    slots = power_ema_slots(config)
    fetched = distributed.fetch([ema_params[i] for i in slots.values()])
    if jax.process_index() != 0:
        return
    directory = Path(workdir) / DIRECTORY
    directory.mkdir(parents=True, exist_ok=True)
    for sigma_rel, params in zip(slots, fetched, strict=True):
        metadata = {"step": step, "sigma_rel": sigma_rel, "gamma": posthoc_ema.gamma_from_sigma_rel(sigma_rel)}
        save(directory / f"{step:08d}-{sigma_rel:g}.safetensors", params, metadata)


def save(path: str | Path, params: nnx.State, metadata: dict[str, Any]) -> None:
    """`params` (on the host) as a safetensors file of one tensor per parameter path, with `metadata`; whole or
    not at all (a temporary name, then a rename). A failed write is an OSError naming the file."""
    from safetensors.numpy import save_file

    path = Path(path)
    partial = path.with_suffix(".partial")
    tensors = {name: np.ascontiguousarray(leaf) for name, leaf in param_paths(params).items()}
    try:
        save_file(tensors, str(partial), metadata={k: repr(v) for k, v in metadata.items()})
        os.replace(partial, path)
    except OSError as e:
        partial.unlink(missing_ok=True)
        raise OSError(f"could not write {path} ({e.strerror or e}); the checkpoints are unaffected") from e


def index(workdir: str | Path) -> list[tuple[int, float, float, Path]]:
    """(step, σ_rel, γ, path) of every snapshot in `workdir`, by step then σ_rel."""
    from safetensors import safe_open

    found = []
    for path in sorted((Path(workdir) / DIRECTORY).glob("*.safetensors")):
        with safe_open(path, framework="numpy") as f:
            meta = f.metadata() or {}
        try:
            found.append((int(meta["step"]), float(meta["sigma_rel"]), float(meta["gamma"]), path))
        except (KeyError, ValueError):
            logging.warning("Skipping %s: not an EMA snapshot (its metadata has no step, sigma_rel and gamma)", path)
    return sorted(found)


def reconstruct(
    workdir: str | Path, step: int, sigma_rel: float, like: nnx.State, field: str = "sample.ema_sigma_rel"
) -> tuple[nnx.State, dict[str, Any]]:
    """The power EMA of `sigma_rel` at snapshot step `step`, rebuilt from `workdir`'s snapshots up to that step,
    as parameters with `like`'s structure, dtypes and shardings; and what the rebuild used (`snapshots`, their
    `weights`, and `profile_error`: the relative L2 error of the fitted averaging profile, EDM2 App. C.3).

    A workdir without snapshots at `step`, or a σ_rel outside (0, 0.2887), is a ConfigError naming `field`."""
    if not 0.0 < sigma_rel < posthoc_ema.sigma_rel_from_gamma(0.0):
        raise ConfigError(f"{field}: {sigma_rel} is not a power EMA's σ_rel; allowed: (0, 0.2887)")
    snapshots = [s for s in index(workdir) if s[0] <= step]
    if not any(s[0] == step for s in snapshots):
        have = sorted({s[0] for s in index(workdir)})
        raise ConfigError(
            f"{field}: post-hoc EMA needs snapshots at step {step}, and {Path(workdir) / DIRECTORY} has them at "
            f"{have or 'no step'} (train with training.ema_sigma_rels and training.ema_snapshot_every, and pick a "
            "checkpoint step that has snapshots)"
        )
    steps = np.array([s[0] for s in snapshots])
    gammas = np.array([s[2] for s in snapshots])
    target = posthoc_ema.gamma_from_sigma_rel(sigma_rel)
    weights = posthoc_ema.reconstruction_weights(steps, gammas, step, target)
    names = param_paths(like)
    total = {name: np.zeros(leaf.shape, np.float32) for name, leaf in names.items()}
    from safetensors import safe_open

    for weight, (_, _, _, path) in zip(weights, snapshots, strict=True):
        if weight == 0.0:
            continue
        with safe_open(path, framework="numpy") as f:
            missing = sorted(set(names) - set(f.keys()))
            if missing:
                raise ConfigError(f"{field}: {path} lacks {missing[:3]} (a snapshot of another model)")
            for name in names:
                total[name] += np.float32(weight) * f.get_tensor(name).astype(np.float32)
    leaves, treedef = jax.tree_util.tree_flatten(like)
    params = jax.tree_util.tree_unflatten(treedef, [
        jax.device_put(total[name].astype(leaf.dtype), getattr(leaf, "sharding", None))
        for name, leaf in zip(names, leaves, strict=True)
    ])
    info = {"sigma_rel": sigma_rel, "step": step, "snapshots": [p.name for *_, p in snapshots],
            "weights": [float(w) for w in weights],
            "profile_error": profile_error(steps, gammas, weights, step, target)}
    return params, info


def profile_error(steps: np.ndarray, gammas: np.ndarray, weights: np.ndarray, step: int, gamma: float) -> float:
    """‖Σ_i w_i p_i − p‖ / ‖p‖ for the target averaging profile p of (step, γ) and the snapshots' p_i."""
    a = posthoc_ema.profile_inner_products(steps, gammas, steps, gammas)
    b = posthoc_ema.profile_inner_products(steps, gammas, [step], [gamma])[:, 0]
    c = posthoc_ema.profile_inner_products([step], [gamma], [step], [gamma])[0, 0]
    squared = weights @ a @ weights - 2.0 * weights @ b + c
    return float(np.sqrt(max(squared, 0.0) / c))


def summary(info: dict[str, Any]) -> str:
    """One log line of a reconstruction's `info`."""
    used = sum(w != 0.0 for w in info["weights"])
    return (f"post-hoc EMA σ_rel={info['sigma_rel']:g} at step {info['step']} from {used} snapshots "
            f"(profile fit error {info['profile_error']:.2%})")

