#!/usr/bin/env bash
# Train diffusion_jax on a Cloud TPU VM slice (one host or a multi-host pod slice).
#
# Usage: launch/tpu_pod.sh COMMAND --name=NAME --zone=ZONE [flags] [-- diffusion_jax.main flags]
#
# Commands (run them in this order; `up` does the first three):
#   create     gcloud compute tpus tpu-vm create: the slice, every worker a TPU VM host
#   setup      put this code on every worker and install it with jax[tpu] (--worker=all)
#   run        python -m diffusion_jax.main on every worker at once, with the flags after --
#   up         create, setup, run
#   teardown   delete the slice (billing stops; the workdir in the bucket stays)
#
# Flags (gcloud's spelling):
#   --name=NAME                  TPU name (required; or $TPU_NAME)
#   --zone=ZONE                  zone, e.g. us-central2-b (required; or $ZONE)
#   --project=PROJECT            Google Cloud project (default: gcloud's configured one)
#   --accelerator-type=TYPE      e.g. v4-32 (4 hosts), v5litepod-16, v5p-32, v6e-16 (default v4-32)
#   --version=RUNTIME            TPU VM runtime, e.g. tpu-ubuntu2204-base (v4), v2-alpha-tpuv5-lite (v5e),
#                                v2-alpha-tpuv5 (v5p), v2-alpha-tpuv6e (v6e) (default tpu-ubuntu2204-base)
#   --spot | --preemptible       create a Spot / preemptible slice (cheaper; may be reclaimed)
#   --repo=URL [--branch=B]      setup: git clone URL on every worker instead of copying this checkout
#   --python=X.Y                 Python of the workers' virtualenv (default 3.11; the runtimes ship 3.10)
#   --detach                     run: start in the background, logs in ~/diffusion_jax.log on each worker
#   --dry-run                    print the gcloud commands instead of running them (gcloud not needed);
#                                the other lines it prints start with '#'
#
# Example (a v4-32 slice: 4 hosts x 4 chips; process i runs on host i, found by JAX from the TPU metadata):
#   launch/tpu_pod.sh up --name=dj --zone=us-central2-b --accelerator-type=v4-32 --spot -- \
#       --config=configs/ddpm_cifar.py --workdir=/mnt/bucket/runs/ddpm_cifar
#   launch/tpu_pod.sh teardown --name=dj --zone=us-central2-b
#
# Every worker must see the same --workdir (orbax writes each process's shards there and process 0
# commits them): a shared file system such as a bucket mounted with gcsfuse at the same path on
# every worker, never a worker's local disk (gs:// paths are not supported yet). The dataset
# (config.data.data_dir) must be readable by every worker too. Run `run` again after a preemption:
# training resumes from the newest checkpoint. See launch/README.md.
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
  exit "${1:-0}"
}

die() {
  echo "error: $*" >&2
  exit 2
}

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REMOTE_DIR="diffusion_jax"  # on each worker, relative to the home directory
VENV="dj-venv"

command="${1:-}"
[[ -n "$command" ]] || usage 2
shift
case "$command" in
  create | setup | run | up | teardown) ;;
  -h | --help | help) usage 0 ;;
  *) die "unknown command '$command'; choose one of: create, setup, run, up, teardown" ;;
esac

name="${TPU_NAME:-}"
zone="${ZONE:-}"
project=""
accelerator_type="v4-32"
runtime_version="tpu-ubuntu2204-base"
capacity=""
repo=""
branch=""
python_version="3.11"
detach=0
dry_run=0
main_args=()
while (($#)); do
  case "$1" in
    --name=*) name="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --accelerator-type=*) accelerator_type="${1#*=}" ;;
    --version=*) runtime_version="${1#*=}" ;;
    --spot) capacity="--spot" ;;
    --preemptible) capacity="--preemptible" ;;
    --repo=*) repo="${1#*=}" ;;
    --branch=*) branch="${1#*=}" ;;
    --python=*) python_version="${1#*=}" ;;
    --detach) detach=1 ;;
    --dry-run) dry_run=1 ;;
    -h | --help) usage 0 ;;
    --)
      shift
      main_args=("$@")
      break
      ;;
    *) die "unknown flag '$1' (flags for diffusion_jax.main go after --); see $0 --help" ;;
  esac
  shift
done
[[ -n "$name" ]] || die "--name: required (the TPU's name), or set \$TPU_NAME"
[[ -n "$zone" ]] || die "--zone: required (e.g. us-central2-b), or set \$ZONE"
[[ -z "$branch" || -n "$repo" ]] || die "--branch: only with --repo"
for arg in "${main_args[@]}"; do
  [[ "$arg" != --dry-run ]] || die "--dry-run: put it before --; after -- it would go to diffusion_jax.main"
done
((dry_run)) || command -v gcloud > /dev/null ||
  die "gcloud: not found; install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install), or use --dry-run"

# A progress message (a '#' comment under --dry-run, so that the output is a script).
say() {
  if ((dry_run)); then echo "# $*"; else echo "$*"; fi
}

# Runs a command, or under --dry-run prints it, one line, quoted for bash where needed.
run_or_print() {
  if ((dry_run)); then
    local word line=()
    for word in "$@"; do
      if [[ "$word" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
        line+=("$word")
      elif [[ "$word" =~ ^(--[a-z-]+=)(.*)$ ]]; then
        line+=("${BASH_REMATCH[1]}${BASH_REMATCH[2]@Q}")  # --flag='a value'
      else
        line+=("${word@Q}")
      fi
    done
    echo "${line[*]}"
  else
    "$@"
  fi
}

gcloud_tpu=(gcloud compute tpus tpu-vm)
where=("--zone=$zone")
[[ -z "$project" ]] || where+=("--project=$project")

# Runs a bash script on every worker of the slice at once; fails if any worker fails.
on_all_workers() {
  run_or_print "${gcloud_tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command="$1"
}

create() {
  local extra=()
  [[ -z "$capacity" ]] || extra+=("$capacity")
  say "Creating $accelerator_type TPU VM '$name' in $zone ($runtime_version)"
  run_or_print "${gcloud_tpu[@]}" create "$name" "${where[@]}" --accelerator-type="$accelerator_type" \
    --version="$runtime_version" "${extra[@]}"
}

setup() {
  if [[ -n "$repo" ]]; then
    local clone
    clone="rm -rf ~/$REMOTE_DIR && git clone --depth=1 ${branch:+--branch=$(printf '%q' "$branch")} $(printf '%q' "$repo") ~/$REMOTE_DIR"
    say "Cloning $repo on every worker"
    on_all_workers "set -euo pipefail; $clone"
  else
    # This checkout as it is (tracked and untracked files; .gitignore'd ones such as .venv and runs/ left out).
    if ((dry_run)); then
      archive="${TMPDIR:-/tmp}/diffusion_jax.tar.gz"
      say "Packing $REPO_ROOT (git ls-files --cached --others --exclude-standard) into $archive"
    else
      archive="$(mktemp -t diffusion_jax.XXXXXX.tar.gz)"
      trap 'rm -f "$archive"' EXIT
      git -C "$REPO_ROOT" ls-files --cached --others --exclude-standard -z |
        tar -C "$REPO_ROOT" --ignore-failed-read --null -T - -czf "$archive"  # a file deleted but not git rm-ed: skipped
      say "Copying $REPO_ROOT ($(du -h "$archive" | cut -f1)) to every worker"
    fi
    run_or_print "${gcloud_tpu[@]}" scp "$archive" "$name:diffusion_jax.tar.gz" "${where[@]}" --worker=all
    on_all_workers "set -euo pipefail; rm -rf ~/$REMOTE_DIR && mkdir ~/$REMOTE_DIR && \
tar -xzf ~/diffusion_jax.tar.gz -C ~/$REMOTE_DIR && rm ~/diffusion_jax.tar.gz"
  fi
  # uv brings a Python >= 3.11 (pyproject's requires-python) next to the runtime's own 3.10.
  say "Installing diffusion_jax[tpu] with Python $python_version on every worker"
  on_all_workers "set -euo pipefail; python3 -m pip install --user --quiet --upgrade uv && \
~/.local/bin/uv venv --quiet --allow-existing --python $(printf '%q' "$python_version") ~/$VENV && \
~/.local/bin/uv pip install --quiet --python ~/$VENV/bin/python -e ~/$REMOTE_DIR'[tpu]'"
}

run() {
  ((${#main_args[@]})) || die "run: give diffusion_jax.main's flags after --, e.g. -- --config=configs/ddpm_cifar.py --workdir=/mnt/bucket/runs/x"
  local args
  args="$(printf '%q ' "${main_args[@]}")"
  args="${args% }"
  # No --coordinator_address etc.: on a TPU VM, diffusion_jax.distributed lets JAX read the
  # workers and this host's index from the TPU metadata (jax.distributed.initialize()).
  local launch="cd ~/$REMOTE_DIR && ~/$VENV/bin/python -m diffusion_jax.main $args"
  if ((detach)); then
    say "Starting on every worker in the background; logs: ~/diffusion_jax.log on each"
    on_all_workers "nohup bash -c $(printf '%q' "$launch") > ~/diffusion_jax.log 2>&1 < /dev/null &"
  else
    say "Running on every worker: python -m diffusion_jax.main $args"
    on_all_workers "$launch"
  fi
}

teardown() {
  say "Deleting TPU VM '$name' in $zone"
  run_or_print "${gcloud_tpu[@]}" delete "$name" "${where[@]}" --quiet
}

case "$command" in
  create) create ;;
  setup) setup ;;
  run) run ;;
  up) create && setup && run ;;
  teardown) teardown ;;
esac
