#!/usr/bin/env bash
# A study on GKE: renders launch/gke_study.yaml (an Indexed Job, one completion per run of the
# study's plan) and applies it; then `collect` runs the summary as a one-pod Job.
#
#   IMAGE=... BUCKET=... launch/gke_study.sh apply -- --config configs/cifar10.py \
#       --methods standard,pgd_at,trades,clead --seeds 3 --workdir /runs/cifar10_study
#   IMAGE=... BUCKET=... launch/gke_study.sh collect -- (the same study arguments)
#   launch/gke_study.sh logs K      (run K's output)
#   launch/gke_study.sh delete
#
# `apply` counts the runs with `python -m clead_jax.study ARGS --plan` here (into a temporary
# directory: the plan does not depend on where the study is written), so clead_jax must be
# importable here, or NUM_RUNS set. --workdir must be under /runs, where gs://BUCKET is mounted.
# Applying the same study again after a failure resumes every unfinished run.
#
# Environment:
#   DRY_RUN=1         print the manifest and the commands, run nothing
#   IMAGE, BUCKET     container image and GCS bucket (without gs://), required for apply/collect
#   JOB_NAME          (default: clead-study); the collection Job is JOB_NAME-collect
#   PARALLELISM       runs at once (default: all of them)
#   GPUS_PER_POD      GPUs of each run (default: 1)
#   ACCELERATOR       GKE accelerator label (default: nvidia-h100-80gb)
#   SERVICE_ACCOUNT   Kubernetes service account with access to the bucket (default: default)
#   SURROGATE_WAIT_S  how long a run waits for its transfer surrogate (default: 86400)
#   NUM_RUNS          the plan's run count (default: from --plan)
#   PYTHON            interpreter for --plan (default: python3)
set -euo pipefail

export JOB_NAME=${JOB_NAME:-clead-study}
export GPUS_PER_POD=${GPUS_PER_POD:-1}
export ACCELERATOR=${ACCELERATOR:-nvidia-h100-80gb}
export SERVICE_ACCOUNT=${SERVICE_ACCOUNT:-default}
here="$(dirname "$0")"

usage() {
  sed -n '2,27p' "$0" >&2
  exit 2
}

# run CMD... (print, then run unless DRY_RUN=1), yaml_list, fill, apply_manifest.
source "$here/dry_run.sh"

# The study's run count: its plan, made in a temporary directory.
count_runs() {
  if [[ -n "${NUM_RUNS:-}" ]]; then
    echo "$NUM_RUNS"
    return
  fi
  local plan_dir args=() previous="" arg
  plan_dir=$(mktemp -d)
  for arg in "$@"; do
    if [[ "$previous" == --workdir ]]; then
      arg="$plan_dir"
    elif [[ "$arg" == --workdir=* ]]; then
      arg="--workdir=$plan_dir"
    fi
    args+=("$arg")
    previous="$arg"
  done
  "${PYTHON:-python3}" -m clead_jax.study "${args[@]}" --plan >&2
  "${PYTHON:-python3}" -c 'import json, sys; print(len(json.load(open(sys.argv[1]))["runs"]))' \
    "$plan_dir/plan.json"
  rm -rf "$plan_dir"
}

# render ARGS...: the manifest for a study with these arguments.
render() {
  export STUDY_ARGS
  STUDY_ARGS=$(yaml_list "$@")
  fill "$here/gke_study.yaml" JOB_NAME NUM_RUNS PARALLELISM GPUS_PER_POD ACCELERATOR \
    SERVICE_ACCOUNT IMAGE BUCKET STUDY_ARGS
}

[[ $# -ge 1 ]] || usage
action=$1
shift
if [[ $# -gt 0 && "$1" == "--" ]]; then
  shift
fi
case "$action" in
  apply|collect)
    [[ $# -gt 0 ]] || usage
    if [[ -z "${IMAGE:-}" || -z "${BUCKET:-}" ]]; then
      echo "$0: set IMAGE and BUCKET (see the comment at the top of this script)" >&2
      exit 2
    fi
    if [[ "$action" == apply ]]; then
      export NUM_RUNS
      NUM_RUNS=$(count_runs "$@")
      export PARALLELISM=${PARALLELISM:-$NUM_RUNS}
      apply_manifest "$(render "$@" \
        '--run_index=$(JOB_COMPLETION_INDEX)' "--surrogate_wait_s=${SURROGATE_WAIT_S:-86400}")"
    else
      export NUM_RUNS=1 PARALLELISM=1
      JOB_NAME="$JOB_NAME-collect" apply_manifest "$(JOB_NAME="$JOB_NAME-collect" \
        render "$@" --collect)"
    fi
    ;;
  logs)
    [[ $# -eq 1 ]] || usage
    run kubectl logs --tail=-1 -l "job-name=$JOB_NAME,batch.kubernetes.io/job-completion-index=$1"
    ;;
  delete)
    run kubectl delete job "$JOB_NAME" "$JOB_NAME-collect" --ignore-not-found
    ;;
  *) usage ;;
esac
