"""launch/slurm.sbatch on a real (one-node) SLURM cluster: 2 tasks x 4 CPU devices join one
jax.distributed run from SLURM's variables, train what 1 process x 8 devices trains, and survive
a preemption (SIGTERM to the tasks, what `#SBATCH --signal` sends before the time limit) by
saving a step that a resubmitted job resumes from.

Needs Debian's slurm-wlm and munge, and root (tests/slurm_box.py). Without them the test is
skipped, unless DIFFUSION_JAX_REQUIRE_LAUNCH=1 (CI), which makes it fail.
"""

import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from multihost_run import REPO, assert_same_training, cache_env, launch_local, load_launcher, run_flags
from slurm_box import SlurmBox, SlurmUnavailable, skip_or_fail

pytestmark = pytest.mark.slow

STEPS = 30  # the preemption (about 1.5 s after the first step here) lands well before the end
JOB_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmBox]:
    """munged, slurmctld and slurmd, started once for the module and always stopped."""
    cluster = SlurmBox(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.__enter__()
    except SlurmUnavailable as e:
        skip_or_fail(f"SLURM in a box: {e}")
    try:
        yield cluster
    finally:
        cluster.stop()


def submit(box: SlurmBox, workdir: Path, output: Path) -> int:
    """sbatch launch/slurm.sbatch as 2 tasks on the one node, each a process of 4 CPU devices."""
    env = load_launcher().child_env(cache_env(), 4) | {"VENV": sys.prefix}
    resources = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0", f"--output={output}"]
    main_flags = [*run_flags(STEPS), f"--workdir={workdir}", "--initialization_timeout=120"]
    return box.sbatch([*resources, "launch/slurm.sbatch", *main_flags], env, cwd=REPO)


def wait_for_log(path: Path, done: Callable[[str], bool], timeout: float = JOB_TIMEOUT_S) -> str:
    """The job's output once `done(output)` holds."""
    deadline = time.monotonic() + timeout
    while not done(text := path.read_text() if path.exists() else ""):
        assert time.monotonic() < deadline, f"timed out waiting on {path}:\n{text[-3000:]}"
        time.sleep(0.1)
    return text


def run_job(box: SlurmBox, job: int, output: Path) -> str:
    """Waits for the job; its output, after checking that it completed with status 0."""
    state, exit_code = box.wait(job, JOB_TIMEOUT_S)
    text = output.read_text()
    assert (state, exit_code) == ("COMPLETED", "0:0"), f"job {job}: {state} {exit_code}\n{text[-5000:]}"
    return text


def test_sbatch_joins_trains_survives_preemption_and_matches_one_process(box, tmp_path):
    reference = launch_local(tmp_path / "one", 1, 8, run_flags(STEPS))  # 1 x 8 devices, meanwhile
    try:
        workdir = tmp_path / "slurm"

        # Job 1: both tasks join the cluster SLURM describes, train, and are preempted after their first step.
        out1 = tmp_path / "job1.out"
        job1 = submit(box, workdir, out1)
        wait_for_log(out1, lambda text: text.count("First step took") == 2)
        box.run("scancel", "--signal=TERM", str(job1))  # to the job step's tasks, as --signal=TERM@300 does
        log1 = run_job(box, job1, out1)
        for i in range(2):
            assert f"Process {i} of 2 (cluster from SLURM): 4 local device(s) of 8" in log1, log1[-3000:]
        preempted = {int(s) for s in re.findall(r"Preempted: saved the checkpoint of step (\d+)", log1)}
        assert len(preempted) == 1, f"the processes must stop at one step, not {preempted}:\n{log1[-3000:]}"
        step = preempted.pop()
        assert 0 < step < STEPS, f"preempted at step {step} of {STEPS}"
        saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
        assert saved[-1] == step and STEPS not in saved

        # Job 2: the same command resumes from that step and finishes.
        out2 = tmp_path / "job2.out"
        log2 = run_job(box, submit(box, workdir, out2), out2)
        assert log2.count(f"Resumed from step {step} of ") == 2, log2[-3000:]
        assert f"step {STEPS}/{STEPS}" in log2

        # The preempted and resumed SLURM run trained what one uninterrupted process trains.
        output = reference.communicate(timeout=JOB_TIMEOUT_S)[0]
        assert reference.returncode == 0, output[-5000:]
        assert_same_training(workdir, tmp_path / "one", STEPS)
    finally:
        if reference.poll() is None:
            reference.kill()
            reference.wait()
