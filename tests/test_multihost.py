"""Multi-process runs: the distributed flags, the local launcher, and 2 processes x 4 devices
training exactly what 1 process x 8 devices trains."""

import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from multihost_run import REPO, assert_same_training, launch_local, load_launcher, run_flags, saved_state

from diffusion_jax import distributed
from diffusion_jax.errors import ConfigError

launcher = load_launcher()

# --- distributed.initialize's flags (nothing connects: every case fails or stays single-process) ---


@pytest.mark.parametrize(
    "flags, message",
    [
        (dict(num_processes=2, process_id=0), "--coordinator_address: required with --num_processes=2"),
        (dict(coordinator_address="10.0.0.1:1234", process_id=1), "--num_processes: required"),
        (dict(coordinator_address="10.0.0.1:1234", num_processes=2), "--process_id: required"),
        (dict(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=2), r"allowed: 0\.\.1"),
        (dict(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=-1), "--process_id: -1"),
        (dict(coordinator_address="10.0.0.1:1234", num_processes=0, process_id=0), "--num_processes: 0"),
        (dict(num_processes=1, process_id=1), "--process_id: 1 is out of range for --num_processes=1"),
        (dict(coordinator_address="10.0.0.1", num_processes=2, process_id=0), "not host:port"),
        (dict(coordinator_address="10.0.0.1:70000", num_processes=2, process_id=0), "not host:port"),
        (dict(local_device_ids=[0, 1]), "--local_device_ids: only applies to a multi-process run"),
        (dict(initialization_timeout=0), "--initialization_timeout: 0"),
    ],
)
def test_inconsistent_flags_name_the_flag(flags, message):
    with pytest.raises(ConfigError, match=message):
        distributed.initialize(**flags)
    assert not jax.distributed.is_initialized()


def test_no_flags_and_no_cluster_is_one_process():
    assert distributed.detect_cluster() is None  # the test machine is no cluster
    assert distributed.initialize() is None
    assert distributed.initialize(num_processes=1) is None  # no address: nothing to connect to
    assert not jax.distributed.is_initialized()


def test_cluster_detection_follows_jax():
    """JAX's SlurmCluster needs SLURM_STEP_NODELIST, set by srun only: a python run straight from an
    sbatch script with --ntasks=8 is one process, not task 0 of 8 whose peers never start."""
    slurm = dict(SLURM_JOB_ID="7", SLURM_STEP_NODELIST="node[1-2]", SLURM_NTASKS="16", SLURM_PROCID="3",
                 SLURM_LOCALID="3")
    assert distributed.detect_cluster(slurm) == "SLURM"
    assert distributed.detect_cluster({k: v for k, v in slurm.items() if k != "SLURM_STEP_NODELIST"}) is None
    assert distributed.detect_cluster(slurm | {"SLURM_NTASKS": "1"}) is None
    ompi = dict(OMPI_MCA_orte_hnp_uri="123.0;tcp://10.0.0.1:4000", OMPI_COMM_WORLD_SIZE="4")
    assert distributed.detect_cluster(ompi) == "Open MPI"
    assert distributed.detect_cluster(ompi | {"OMPI_COMM_WORLD_SIZE": "1"}) is None
    # In a detected cluster the flags are optional overrides, still checked against each other.
    assert distributed.check_flags(None, None, None, None, 300, "SLURM")
    with pytest.raises(ConfigError, match="allowed: 0..3"):
        distributed.check_flags(None, 4, 4, None, 300, "SLURM")


def test_device_ids_flag():
    assert distributed.parse_device_ids(None) is None
    assert distributed.parse_device_ids(["0", "1", "3"]) == [0, 1, 3]
    with pytest.raises(ConfigError, match="--local_device_ids: '0,x'"):
        distributed.parse_device_ids(["0", "x"])
    with pytest.raises(ConfigError, match="distinct non-negative"):
        distributed.parse_device_ids(["1", "1"])


def test_main_rejects_bad_flags_before_starting_jax(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "diffusion_jax.main", "--config=configs/ddpm_swissroll.py", f"--workdir={tmp_path}",
         "--num_processes=2", "--process_id=0"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --coordinator_address: required")
    assert not any(tmp_path.iterdir())


# --- launch/local.py ---


def test_launcher_flags(capsys):
    args = launcher.parse_args(["--num_processes=3", "--devices_per_process=2", "--", "--config=c.py", "--workdir=w"])
    assert (args.num_processes, args.devices_per_process, args.main_args) == (3, 2, ["--config=c.py", "--workdir=w"])
    assert launcher.child_command(args.main_args, 1234, 3, 2)[-5:] == [
        "--config=c.py", "--workdir=w", "--coordinator_address=127.0.0.1:1234", "--num_processes=3", "--process_id=2",
    ]
    env = launcher.child_env({"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_foo=1"}, 2)
    assert env["XLA_FLAGS"].split() == ["--xla_foo=1", "--xla_force_host_platform_device_count=2"]
    assert env["JAX_PLATFORMS"] == "cpu" and str(REPO) in env["PYTHONPATH"]
    for bad, message in [
        (["--num_processes=0"], "--num_processes: 0"),
        (["--devices_per_process=0"], "--devices_per_process: 0"),
        (["--", "--config=c.py", "--process_id=1"], "--process_id=1: the launcher sets"),
        (["--config=c.py"], "unrecognized arguments"),  # main's flags go after --
    ]:
        with pytest.raises(SystemExit) as info:
            launcher.parse_args(bad)
        assert info.value.code == 2
        assert message in capsys.readouterr().err


def test_launcher_stops_the_others_when_one_fails(capsys):
    commands = [
        [sys.executable, "-c", "import time; print('waiting', flush=True); time.sleep(120)"],
        [sys.executable, "-c", "import sys, time; time.sleep(0.5); print('failing'); sys.exit(3)"],
    ]
    started = time.perf_counter()
    assert launcher.supervise(commands, dict(os.environ)) == 3
    assert time.perf_counter() - started < 30
    out = capsys.readouterr()
    assert "[p0] waiting" in out.out and "[p1] failing" in out.out
    assert "process 1 exited with status 3" in out.err


# --- 2 processes x 4 devices == 1 process x 8 devices ---

STEPS = 10


def test_two_processes_train_what_one_process_trains(tmp_path):
    """Same global batches, same mesh of 8 devices: the parameters, EMA and optimiser state after
    training agree to float rounding, and so do the samples gathered from both processes."""
    two, one = tmp_path / "two", tmp_path / "one"
    flags = run_flags(STEPS)
    procs = {"2x4": launch_local(two, 2, 4, flags), "1x8": launch_local(one, 1, 8, flags)}  # each waits on the other's
    outputs = {name: proc.communicate(timeout=600)[0] for name, proc in procs.items()}
    for name, proc in procs.items():
        assert proc.returncode == 0, f"{name} failed:\n{outputs[name][-5000:]}"
    assert "[p1]" in outputs["2x4"] and "Process 1 of 2" in outputs["2x4"]

    final, middle = saved_state(one, STEPS), saved_state(one, STEPS // 2)
    moved = max(np.abs(final[k] - middle[k]).max() for k in final if "params" in k)
    assert moved > 1e-3  # the last 5 steps changed the parameters far beyond the comparison's tolerance
    assert_same_training(two, one, STEPS)  # and the samples gathered from both processes' devices
