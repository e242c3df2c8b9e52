"""Multi-process runs on JAX's own runtime: joining the cluster, and bringing results to the host.

JAX runs one Python process per host (or per GPU) and every process executes the same program
("multi-controller"); `jax.distributed.initialize` connects them to process 0's coordinator
service before any backend starts, so that `jax.devices()` lists the devices of every process
and a `jax.Array` can span all of them (https://docs.jax.dev/en/latest/multi_process.html).

`initialize` is called by the entry point right after the XLA flags are set:

- with `--coordinator_address/--num_processes/--process_id` (e.g. from `launch/local.py`), it
  joins that cluster;
- with none of them, it calls `jax.distributed.initialize()` without arguments only where JAX's
  own cluster detection (`jax._src.clusters`, jax 0.10) finds a multi-process job: an `srun`
  step of a SLURM job with more than one task (`SlurmCluster`), an Open MPI `mpirun` with more
  than one rank (`OmpiCluster`), or a Cloud TPU VM (`GceTpuCluster`/`GkeTpuCluster`, which read
  the slice's workers from the TPU metadata). Anywhere else it does nothing: a laptop, a single
  GPU or an 8-GPU node run as one process, with no coordinator to wait for.

JAX does not let a mistake here fail politely: a process whose peers never connect is aborted
(SIGABRT, no Python exception) after `initialization_timeout` seconds
(shared/notes/stack-2026-11.md, trap 10). So every inconsistent combination of flags is a
ConfigError naming the flag before anything connects.
"""

import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from diffusion_jax.errors import ConfigError

# jax.distributed.initialize's own default (seconds to wait for every process to connect).
DEFAULT_TIMEOUT = 300

# The variables JAX's SlurmCluster.is_env_present requires. SLURM_STEP_NODELIST is set by `srun`,
# not in the batch script itself, so a `python` run straight from an sbatch script (one process,
# whatever its --ntasks) is not mistaken for task 0 of a job step whose other tasks never start.
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


def _on_cloud_tpu_vm() -> bool:
    """JAX's test for a Cloud TPU VM: libtpu installed and TPU chips on the PCI bus.

    `import jax` runs it (`jax._src.cloud_tpu_init`); JAX's TPU cluster detection asks the same
    flag before it queries the TPU metadata server, so no network request is made elsewhere.
    """
    from jax._src import cloud_tpu_init

    return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def detect_cluster(environ: Mapping[str, str] | None = None) -> str | None:
    """The multi-process job this process runs in, in JAX's detection order, or None.

    'Open MPI' (mpirun with OMPI_COMM_WORLD_SIZE > 1), 'SLURM' (an srun step with
    SLURM_NTASKS > 1) or 'Cloud TPU' (a TPU VM: one worker or a pod slice, which JAX's
    TPU detection sizes from the metadata server). A one-task SLURM step or one-rank mpirun is
    None: a single process needs no coordinator.
    """
    env = os.environ if environ is None else environ
    if "OMPI_MCA_orte_hnp_uri" in env and int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "Open MPI"
    if all(var in env for var in _SLURM_VARS) and int(env["SLURM_NTASKS"]) > 1:
        return "SLURM"
    if _on_cloud_tpu_vm():
        return "Cloud TPU"
    return None


def _check_address(address: str) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            f"--coordinator_address: {address!r} is not host:port; give process 0's address and a free port, "
            "e.g. 10.0.0.1:1234 (port 1-65535)"
        )


def parse_device_ids(values: Sequence[str] | None) -> list[int] | None:
    """`--local_device_ids=0,1,2,3` (absl gives ['0', '1', '2', '3']) as ints; None when unset."""
    if not values:
        return None
    try:
        ids = [int(v) for v in values]
    except ValueError:
        raise ConfigError(
            f"--local_device_ids: {','.join(values)!r} is not a comma-separated list of device numbers, e.g. 0,1,2,3"
        ) from None
    if any(i < 0 for i in ids) or len(set(ids)) != len(ids):
        raise ConfigError(f"--local_device_ids: {ids} must be distinct non-negative device numbers")
    return ids


def check_flags(
    coordinator_address: str | None,
    num_processes: int | None,
    process_id: int | None,
    local_device_ids: Sequence[int] | None,
    initialization_timeout: int,
    cluster: str | None,
) -> bool:
    """Validates the flags against each other; returns whether to call `jax.distributed.initialize`.

    In a detected `cluster` the flags are optional overrides (JAX fills in the rest from the
    environment). Outside one, a multi-process run needs all of --coordinator_address,
    --num_processes > 1 and --process_id; `--num_processes=1` is a single process, joined to a
    one-process cluster when an address is given (as `launch/local.py --num_processes=1` does).
    Every failure is a ConfigError naming the flag and what is allowed.
    """
    timeout = initialization_timeout
    if isinstance(timeout, bool) or not isinstance(timeout, int) or timeout <= 0:
        raise ConfigError(f"--initialization_timeout: {timeout!r}; expected a positive number of seconds")
    if num_processes is not None and num_processes < 1:
        raise ConfigError(f"--num_processes: {num_processes}; expected a positive int (1 is a single process)")
    if process_id is not None and process_id < 0:
        raise ConfigError(f"--process_id: {process_id}; expected 0..num_processes-1")
    if num_processes is not None and process_id is not None and process_id >= num_processes:
        raise ConfigError(
            f"--process_id: {process_id} is out of range for --num_processes={num_processes}; "
            f"allowed: 0..{num_processes - 1}"
        )
    if coordinator_address is not None:
        _check_address(coordinator_address)
    explicit = (coordinator_address, num_processes, process_id)
    if cluster is not None:
        return True
    if all(flag is None for flag in explicit):
        if local_device_ids is not None:
            raise ConfigError(
                "--local_device_ids: only applies to a multi-process run; add --coordinator_address, "
                "--num_processes and --process_id, or launch under SLURM (srun), Open MPI or on a TPU VM"
            )
        return False
    if num_processes is None:
        raise ConfigError(
            "--num_processes: required with --coordinator_address or --process_id (the number of processes "
            "in the run; no SLURM, Open MPI or TPU environment was detected to supply it)"
        )
    if num_processes == 1:
        return coordinator_address is not None
    if coordinator_address is None:
        raise ConfigError(
            f"--coordinator_address: required with --num_processes={num_processes}: host:port of process 0, "
            "the same on every process (e.g. 10.0.0.1:1234)"
        )
    if process_id is None:
        raise ConfigError(
            f"--process_id: required with --num_processes={num_processes}: this process's index, "
            f"0..{num_processes - 1}, different on every process"
        )
    return True


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
    initialization_timeout: int = DEFAULT_TIMEOUT,
) -> str | None:
    """Joins the multi-process run described by the flags or the environment (module docstring).

    Must run before anything starts a JAX backend (`jax.devices()`, any computation): JAX
    raises a RuntimeError otherwise. Returns where the cluster came from ('flags', 'SLURM',
    'Open MPI', 'Cloud TPU'), or None for a single process (nothing is initialised).

    `local_device_ids` restricts the GPUs this process drives (JAX sets the visible CUDA
    devices): under SLURM JAX gives each task the one GPU numbered by its SLURM_LOCALID (one
    task per GPU); with one task per node pass every GPU, e.g. 0,1,2,3,4,5,6,7.
    """
    cluster = detect_cluster()
    if not check_flags(
        coordinator_address, num_processes, process_id, local_device_ids, initialization_timeout, cluster
    ):
        return None
    if num_processes == 1 and process_id is None:
        process_id = 0  # the only process; JAX would otherwise look for a cluster to supply it
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
        initialization_timeout=initialization_timeout,
    )
    return "flags" if cluster is None else cluster


def fetch(tree: Any) -> Any:
    """`tree` with every jax.Array as a NumPy array holding all of it, on every process.

    `jax.device_get` fails for an array that spans other processes' devices (a batch sharded
    over a multi-process mesh: "RuntimeError: Fetching value for `jax.Array` that spans
    non-addressable (non process local) devices is not possible"), unless every process holds a
    full copy (a replicated array). Such leaves are all-gathered (`multihost_utils.process_allgather`),
    so every process gets the same full result and can compute the same statistics; only process 0
    writes them. The all-gather is a collective: every process must call `fetch` on the same arrays
    in the same order.
    """

    def leaf(x: Any) -> Any:
        if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return jax.device_get(x)

    return jax.tree.map(leaf, tree)
