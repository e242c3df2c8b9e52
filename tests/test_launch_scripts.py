"""The shell launchers: launch/tpu_pod.sh's gcloud commands (--dry-run, no gcloud needed), their
one-line errors, and shellcheck on every script in launch/ (Debian's `shellcheck`; skipped when it
is missing, unless DIFFUSION_JAX_REQUIRE_LAUNCH=1)."""

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from multihost_run import REPO
from slurm_box import skip_or_fail

TPU_POD = REPO / "launch" / "tpu_pod.sh"
GCLOUD_TPU = ["gcloud", "compute", "tpus", "tpu-vm"]
MAIN_FLAGS = ["--config=configs/ddpm_cifar.py", "--workdir=/mnt/bucket/runs/ddpm cifar"]  # a space: quoted


def tpu_pod(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """launch/tpu_pod.sh with a `gcloud` on PATH that fails the test if anything calls it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "gcloud").write_text(f"#!/bin/sh\ntouch {tmp_path}/gcloud_ran\nexit 97\n")
    (bin_dir / "gcloud").chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "TMPDIR": "/tmp"}
    done = subprocess.run(["bash", str(TPU_POD), *args], env=env, capture_output=True, text=True, timeout=60)
    assert not (tmp_path / "gcloud_ran").exists(), "--dry-run ran gcloud"
    return done


def dry_run(args: list[str], tmp_path: Path) -> list[list[str]]:
    """The commands `tpu_pod.sh <args> --dry-run` prints, each split as bash would."""
    at = args.index("--") if "--" in args else len(args)  # after -- it would be a flag of diffusion_jax.main
    done = tpu_pod([*args[:at], "--dry-run", *args[at:]], tmp_path)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line and not line.startswith("#")]
    commands = [shlex.split(line) for line in lines]
    assert all(c[:4] == GCLOUD_TPU for c in commands), done.stdout
    return commands


def remote(command: list[str]) -> list[str]:
    """The words of the bash command a `gcloud ... ssh --worker=all --command=...` runs on every worker."""
    assert command[4] == "ssh" and "--worker=all" in command, command
    (script,) = [w.removeprefix("--command=") for w in command if w.startswith("--command=")]
    return shlex.split(script)


def test_tpu_pod_up_and_teardown_print_the_documented_gcloud_commands(tmp_path):
    where = ["--name=dj", "--zone=us-central2-b"]
    create, scp, unpack, install, run = dry_run(
        ["up", *where, "--accelerator-type=v4-32", "--spot", "--", *MAIN_FLAGS], tmp_path
    )
    assert create == [*GCLOUD_TPU, "create", "dj", "--zone=us-central2-b", "--accelerator-type=v4-32",
                      "--version=tpu-ubuntu2204-base", "--spot"]
    # setup: this checkout, copied to and unpacked on every worker, installed with jax[tpu].
    assert scp[4:6] == ["scp", scp[5]] and scp[5].endswith(".tar.gz")
    assert scp[6:] == ["dj:diffusion_jax.tar.gz", "--zone=us-central2-b", "--worker=all"]
    assert "tar -xzf ~/diffusion_jax.tar.gz -C ~/diffusion_jax" in " ".join(remote(unpack))
    assert "~/diffusion_jax[tpu]" in " ".join(remote(install))
    # run: the same command on every worker; JAX reads the workers and this host's index from the TPU metadata.
    assert run[5:] == ["dj", "--zone=us-central2-b", "--worker=all", run[-1]]
    assert remote(run) == ["cd", "~/diffusion_jax", "&&", "~/dj-venv/bin/python", "-m", "diffusion_jax.main",
                           *MAIN_FLAGS]

    (delete,) = dry_run(["teardown", *where], tmp_path)
    assert delete == [*GCLOUD_TPU, "delete", "dj", "--zone=us-central2-b", "--quiet"]


def test_tpu_pod_v5e_slice_from_a_repository_in_the_background(tmp_path):
    args = ["--name=dj5", "--zone=us-west4-a", "--project=my-proj", "--accelerator-type=v5litepod-16",
            "--version=v2-alpha-tpuv5-lite", "--preemptible", "--repo=https://github.com/me/dj.git", "--branch=v1"]
    (create,) = dry_run(["create", *args], tmp_path)
    assert create[4:] == ["create", "dj5", "--zone=us-west4-a", "--project=my-proj",
                          "--accelerator-type=v5litepod-16", "--version=v2-alpha-tpuv5-lite", "--preemptible"]
    clone, install = dry_run(["setup", *args], tmp_path)
    assert remote(clone)[-6:] == ["git", "clone", "--depth=1", "--branch=v1", "https://github.com/me/dj.git",
                                  "~/diffusion_jax"]
    assert all("--project=my-proj" in c and "--worker=all" in c for c in (clone, install))
    (run,) = dry_run(["run", *args, "--detach", "--", *MAIN_FLAGS], tmp_path)
    nohup = remote(run)
    assert nohup[:3] == ["nohup", "bash", "-c"] and nohup[4:] == [">", "~/diffusion_jax.log", "2>&1", "<",
                                                                  "/dev/null", "&"]
    assert shlex.split(nohup[3])[3:] == ["~/dj-venv/bin/python", "-m", "diffusion_jax.main", *MAIN_FLAGS]


def test_launch_readme_shows_what_the_dry_run_prints(tmp_path):
    readme = (REPO / "launch" / "README.md").read_text().splitlines()
    documented = [line for line in readme if line.startswith(" ".join(GCLOUD_TPU))]
    args = ["up", "--dry-run", "--name=dj", "--zone=us-central2-b", "--accelerator-type=v4-32",
            "--version=tpu-ubuntu2204-base", "--spot", "--", "--config=configs/ddpm_cifar.py",
            "--workdir=/mnt/bucket/runs/ddpm_cifar"]
    printed = [line for line in tpu_pod(args, tmp_path).stdout.splitlines() if not line.startswith("#")]
    assert printed == documented


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "Usage: launch/tpu_pod.sh COMMAND"),
        (["start"], "error: unknown command 'start'; choose one of: create, setup, run, up, teardown"),
        (["create", "--zone=z"], "error: --name: required"),
        (["create", "--name=n"], "error: --zone: required"),
        (["create", "--name=n", "--zone=z", "--config=c.py"], "error: unknown flag '--config=c.py'"),
        (["setup", "--name=n", "--zone=z", "--branch=b"], "error: --branch: only with --repo"),
        (["run", "--name=n", "--zone=z", "--dry-run"], "error: run: give diffusion_jax.main's flags after --"),
        (["up", "--name=n", "--zone=z", "--", "--config=c.py", "--dry-run"], "error: --dry-run: put it before --"),
    ],
)
def test_tpu_pod_bad_input_is_one_line(tmp_path, args, message):
    done = tpu_pod(args, tmp_path)
    assert done.returncode == 2
    if message.startswith("error:"):
        assert done.stderr.strip() == done.stderr.strip().splitlines()[0] and done.stderr.startswith(message)
    else:
        assert message in done.stdout + done.stderr


def test_tpu_pod_needs_gcloud_unless_dry_run(tmp_path):
    (tmp_path / "dirname").symlink_to(shutil.which("dirname"))  # the only program teardown needs besides gcloud
    done = subprocess.run([shutil.which("bash"), str(TPU_POD), "teardown", "--name=n", "--zone=z"],
                          env={"PATH": str(tmp_path)}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.startswith("error: gcloud: not found; install the Google Cloud CLI")


def test_slurm_sbatch_without_flags_is_one_line():
    done = subprocess.run(["bash", str(REPO / "launch" / "slurm.sbatch")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.startswith("error: give diffusion_jax.main's flags") and len(done.stderr.splitlines()) == 1


def shell_scripts() -> list[Path]:
    """Every script in launch/ that bash runs: *.sh, *.sbatch, or a bash/sh shebang."""
    shebangs = (b"#!/bin/sh", b"#!/bin/bash", b"#!/usr/bin/env bash", b"#!/usr/bin/env sh")
    return sorted(
        p for p in (REPO / "launch").iterdir()
        if p.is_file() and (p.suffix in (".sh", ".sbatch") or p.read_bytes().startswith(shebangs))
    )


def test_launch_scripts_are_shellcheck_clean():
    scripts = shell_scripts()
    assert {p.name for p in scripts} >= {"tpu_pod.sh", "slurm.sbatch"}
    if shutil.which("shellcheck") is None:
        skip_or_fail("shellcheck is not installed (apt-get install -y shellcheck)")
    done = subprocess.run(["shellcheck", "--shell=bash", *map(str, scripts)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
