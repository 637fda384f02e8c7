#!/usr/bin/env bash
# Multi-host GPU training on GKE: renders launch/gke.yaml (an Indexed Job, one pod per node, and
# a headless Service for the coordinator) and applies it with kubectl.
#
#   IMAGE=... BUCKET=... launch/gke.sh apply -- --config configs/cifar10.py --workdir /runs/cifar10
#   launch/gke.sh logs        (process 0's output: progress and report)
#   launch/gke.sh delete
#
# The image is built from launch/Dockerfile. --workdir must be under /runs, where gs://BUCKET is
# mounted in every pod. The global batch must be a multiple of NUM_PROCESSES x GPUS_PER_POD.
# Applying the same command again after a failure resumes from the last checkpoint.
#
# Environment:
#   DRY_RUN=1        print the manifest and the commands, run nothing
#   IMAGE            container image (required for apply)
#   BUCKET           GCS bucket for the workdirs, without gs:// (required for apply)
#   JOB_NAME         (default: clead-jax)
#   NUM_PROCESSES    pods, one per node (default: 2)
#   GPUS_PER_POD     (default: 8)
#   ACCELERATOR      GKE accelerator label (default: nvidia-h100-80gb)
#   SERVICE_ACCOUNT  Kubernetes service account with access to the bucket (default: default)
set -euo pipefail

export JOB_NAME=${JOB_NAME:-clead-jax}
export NUM_PROCESSES=${NUM_PROCESSES:-2}
export GPUS_PER_POD=${GPUS_PER_POD:-8}
export ACCELERATOR=${ACCELERATOR:-nvidia-h100-80gb}
export SERVICE_ACCOUNT=${SERVICE_ACCOUNT:-default}
template="$(dirname "$0")/gke.yaml"

usage() {
  sed -n '2,22p' "$0" >&2
  exit 2
}

# run CMD... (print, then run unless DRY_RUN=1), yaml_list, fill, apply_manifest.
source "$(dirname "$0")/dry_run.sh"

render() {
  export MAIN_ARGS
  MAIN_ARGS=$(yaml_list "$@")
  fill "$template" JOB_NAME NUM_PROCESSES GPUS_PER_POD ACCELERATOR SERVICE_ACCOUNT IMAGE BUCKET \
    MAIN_ARGS
}

[[ $# -ge 1 ]] || usage
action=$1
shift
if [[ $# -gt 0 && "$1" == "--" ]]; then
  shift
fi
case "$action" in
  apply)
    [[ $# -gt 0 ]] || usage
    if [[ -z "${IMAGE:-}" || -z "${BUCKET:-}" ]]; then
      echo "$0: set IMAGE and BUCKET (see the comment at the top of this script)" >&2
      exit 2
    fi
    apply_manifest "$(render "$@")"
    ;;
  logs)
    run kubectl logs -f --tail=-1 \
      -l "job-name=$JOB_NAME,batch.kubernetes.io/job-completion-index=0"
    ;;
  delete)
    run kubectl delete job,service "$JOB_NAME" --ignore-not-found
    ;;
  *) usage ;;
esac
