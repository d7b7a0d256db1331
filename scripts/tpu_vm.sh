#!/usr/bin/env bash
# Set up and launch vit_jax on every worker of a Cloud TPU VM (single host or
# pod slice). Run it on your own machine, with gcloud authenticated.
#
#   scripts/tpu_vm.sh [--dry-run] setup  TPU_NAME ZONE
#   scripts/tpu_vm.sh [--dry-run] launch TPU_NAME ZONE -- --config=configs/vit.py:b16,cifar10 \
#       --workdir=gs://BUCKET/b16_cifar10 --config.pretrained_dir=gs://vit_models/imagenet21k
#
# `setup` copies this checkout to every worker and installs it with JAX for
# TPU; `launch` runs the same `python -m vit_jax.main` command on all workers
# with --config.distributed=True, so each host feeds its local TPU cores and
# only process 0 writes metrics and results. The workdir must be shared by
# all workers (a gs:// bucket). --dry-run prints each command (git, gcloud)
# on one line, quoted for a shell, instead of running it; it needs neither
# gcloud nor a TPU. Not run on a TPU by this project's CI (no TPU there).
set -euo pipefail

usage() {
  sed -n '2,16p' "$0" >&2
  exit 2
}

dry_run=false
if [ "${1:-}" = "--dry-run" ]; then
  dry_run=true
  shift
fi
[ $# -ge 3 ] || usage
action="$1" name="$2" zone="$3"
shift 3

# Runs its arguments as a command, or prints them with --dry-run.
run() {
  if "$dry_run"; then
    printf '%q' "$1"
    shift
    printf ' %q' "$@"
    printf '\n'
  else
    "$@"
  fi
}

ssh_all() {
  run gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all \
    --command="$1"
}

case "$action" in
  setup)
    repo="$(cd "$(dirname "$0")/.." && pwd)"
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    archive="$tmp/vit_jax.tar.gz"
    run git -C "$repo" archive --format=tar.gz -o "$archive" HEAD
    run gcloud compute tpus tpu-vm scp "$archive" "$name:~/vit_jax.tar.gz" \
      --zone="$zone" --worker=all
    # One line (so --dry-run prints one line); the jax version is the one
    # requirements.txt installed, read on the worker.
    ssh_all 'set -e; rm -rf ~/vit_jax && mkdir ~/vit_jax && tar -xzf ~/vit_jax.tar.gz -C ~/vit_jax && cd ~/vit_jax && python3 -m venv ~/venv && . ~/venv/bin/activate && pip install -q -r requirements.txt -e . && pip install -q "jax[tpu]==$(python -c "import jax; print(jax.__version__)")"'
    ;;
  launch)
    [ "${1:-}" = "--" ] && shift
    args=""
    [ $# -gt 0 ] && args=$(printf ' %q' "$@")
    ssh_all "cd ~/vit_jax && . ~/venv/bin/activate && python -m vit_jax.main$args --config.distributed=True"
    ;;
  *) usage ;;
esac
