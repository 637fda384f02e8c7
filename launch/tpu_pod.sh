#!/usr/bin/env bash
# Trains on a Cloud TPU pod slice: creates the TPU VMs, installs this repository on every worker,
# runs the same command on all workers at once, and deletes the slice.
#
#   launch/tpu_pod.sh create
#   launch/tpu_pod.sh install
#   launch/tpu_pod.sh run -- --config configs/cifar10.py --workdir /mnt/clead/runs/cifar10
#   launch/tpu_pod.sh delete
#   launch/tpu_pod.sh all -- MAIN_ARGS...      (create, install, run, delete)
#
# Every worker is one JAX process; jax.distributed.initialize() finds the others by itself on
# Cloud TPU (clead_jax/distributed.py), and the mesh spans every chip of every worker.
# Checkpoints are written by all workers into one directory, so --workdir must be on storage that
# every worker sees: with BUCKET set, `install` mounts gs://BUCKET at /mnt/clead on each worker
# (gcsfuse). Only worker 0 writes logs and the report.
#
# Environment:
#   DRY_RUN=1         print the commands, run nothing
#   TPU_NAME          (default: clead-jax)
#   ZONE              (default: us-central2-b)
#   ACCELERATOR_TYPE  (default: v4-32: 4 workers x 4 chips)
#   RUNTIME_VERSION   (default: tpu-ubuntu2204-base)
#   PROJECT           GCP project (default: gcloud's)
#   SPOT=1            create a Spot slice
#   BUCKET            GCS bucket (no gs://) mounted at /mnt/clead by `install`
set -euo pipefail

tpu_name=${TPU_NAME:-clead-jax}
zone=${ZONE:-us-central2-b}
accelerator_type=${ACCELERATOR_TYPE:-v4-32}
runtime_version=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
remote_dir=clead_jax  # under each worker's home directory

usage() {
  sed -n '2,27p' "$0" >&2
  exit 2
}

# run CMD...: prints the command, then runs it unless DRY_RUN=1.
source "$(dirname "$0")/dry_run.sh"

gcloud_tpu=(gcloud compute tpus tpu-vm)
where=("$tpu_name" "--zone=$zone")
if [[ -n "${PROJECT:-}" ]]; then
  where+=("--project=$PROJECT")
fi

create() {
  local extra=()
  if [[ "${SPOT:-0}" == 1 ]]; then
    extra+=(--spot)
  fi
  run "${gcloud_tpu[@]}" create "${where[@]}" "--accelerator-type=$accelerator_type" \
    "--version=$runtime_version" ${extra[@]+"${extra[@]}"}
}

install_repo() {
  local repo archive
  repo=$(cd "$(dirname "$0")/.." && pwd)
  archive=${TMPDIR:-/tmp}/clead_jax_src.tar.gz
  run tar -czf "$archive" -C "$repo" --exclude=.git --exclude=runs --exclude='*.egg-info' \
    --exclude=__pycache__ .
  run "${gcloud_tpu[@]}" scp "$archive" "$tpu_name:clead_jax_src.tar.gz" "--zone=$zone" \
    ${PROJECT:+"--project=$PROJECT"} --worker=all
  local setup="rm -rf $remote_dir && mkdir -p $remote_dir && tar -xzf clead_jax_src.tar.gz -C $remote_dir"
  setup+=" && python3 -m pip install -q -U 'jax[tpu]' && python3 -m pip install -q -e $remote_dir"
  if [[ -n "${BUCKET:-}" ]]; then
    setup+=" && (command -v gcsfuse >/dev/null || (echo 'deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-'\$(lsb_release -cs)' main' | sudo tee /etc/apt/sources.list.d/gcsfuse.list"
    setup+=" && curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null"
    setup+=" && sudo apt-get update -q && sudo apt-get install -y -q gcsfuse))"
    setup+=" && sudo mkdir -p /mnt/clead && sudo chown \$USER /mnt/clead"
    setup+=" && (mountpoint -q /mnt/clead || gcsfuse --implicit-dirs $BUCKET /mnt/clead)"
  fi
  run "${gcloud_tpu[@]}" ssh "${where[@]}" --worker=all "--command=$setup"
}

train() {
  [[ $# -gt 0 ]] || usage
  local command="cd $remote_dir && python3 -m clead_jax.main"
  command+=$(printf ' %q' "$@")
  run "${gcloud_tpu[@]}" ssh "${where[@]}" --worker=all "--command=$command"
}

delete() {
  run "${gcloud_tpu[@]}" delete "${where[@]}" --quiet
}

[[ $# -ge 1 ]] || usage
action=$1
shift
if [[ $# -gt 0 && "$1" == "--" ]]; then
  shift
fi
case "$action" in
  create) create ;;
  install) install_repo ;;
  run) train "$@" ;;
  delete) delete ;;
  all)
    create
    trap delete EXIT  # the slice is deleted even when training fails
    install_repo
    train "$@"
    ;;
  *) usage ;;
esac
