#!/usr/bin/env bash
# A study on SLURM: each run of the study's plan is one task of a job array, and one more job
# collects the table when the array has ended.
#
#   launch/study_slurm.sh --config configs/cifar10.py --methods standard,pgd_at,trades,clead \
#       --seeds 3 --workdir /shared/runs/cifar10_study
#   DRY_RUN=1 launch/study_slurm.sh ...    # the plan and the sbatch commands; submits nothing
#   RUNS=5 launch/study_slurm.sh ...       # (re)submit run 5 alone, then the collection
#
# The arguments are those of `python -m clead_jax.study`. This script writes DIR/plan.json with
# `--plan` (also in a dry run), then submits:
#   1. the runs that no other run depends on, as one array (`--array=0,1,...`): task K runs
#      `python -m clead_jax.study ARGS --run_index=K` (it resumes run K if it was started);
#   2. the runs whose transfer surrogate is another run of the plan (the study's standard runs),
#      as a second array that starts after the first one has ended (--dependency=afterany);
#   3. `python -m clead_jax.study ARGS --collect` after both arrays (afterany): study.md and
#      study.json from the runs that finished, naming the others.
# A task that was cancelled, preempted or failed is resubmitted with RUNS=K (comma-separated
# indices); the same command resumes it from its last checkpoint. --workdir must be on a
# filesystem every node sees. Each task's output: DIR/slurm/<job name>-<job>_<task>.out.
#
# Environment:
#   GPUS_PER_TASK  GPUs of each run (default 1; 0: none)
#   CPUS_PER_TASK  CPUs of each run (default 8)
#   TIME_LIMIT     time limit of each run (default 24:00:00) and of the collection
#   PARTITION      partition (default: the cluster's default)
#   RUNS           indices of the runs to submit (default: every run of the plan)
#   VENV           a virtual environment to activate first, here and in every task
#   PYTHON         interpreter (default: python3)
#   DRY_RUN=1      print the sbatch commands, submit nothing
set -euo pipefail

if [[ $# -eq 0 ]]; then
  sed -n '2,33p' "$0" >&2
  exit 2
fi
if [[ -n "${VENV:-}" ]]; then
  # shellcheck disable=SC1091
  source "$VENV/bin/activate"
fi
# show CMD...: prints a command after "+ ", quoted so that it can be pasted.
source "$(dirname "$0")/dry_run.sh"
python="${PYTHON:-python3}"
workdir=""
previous=""
for arg in "$@"; do
  case "$arg" in
    --workdir=*) workdir="${arg#--workdir=}" ;;
    *) if [[ "$previous" == --workdir ]]; then workdir="$arg"; fi ;;
  esac
  previous="$arg"
done
if [[ -z "$workdir" ]]; then
  echo "error: --workdir is missing: name the study's directory (on a filesystem every node sees)" >&2
  exit 2
fi

# The plan: every run's index, and which runs wait for another one (their surrogate).
"$python" -m clead_jax.study "$@" --plan
read -r first second < <("$python" - "$workdir/plan.json" "${RUNS:-}" <<'EOF'
import json, sys
runs = json.load(open(sys.argv[1]))["runs"]
chosen = {int(k) for k in sys.argv[2].split(",") if k.strip()} if sys.argv[2] else None
if chosen is not None and not chosen <= {r["index"] for r in runs}:
  sys.exit(f"error: RUNS={sys.argv[2]}: the plan has runs 0 to {len(runs) - 1}")
pick = lambda waits: ",".join(str(r["index"]) for r in runs
                              if (r["needs"] is not None) == waits
                              and (chosen is None or r["index"] in chosen)) or "-"
print(pick(False), pick(True))
EOF
)

quoted_args=$(printf '%q ' "$@")
activate=""
if [[ -n "${VENV:-}" ]]; then
  activate="source $(printf '%q' "$VENV")/bin/activate && "
fi
common=(--parsable --time="${TIME_LIMIT:-24:00:00}")
if [[ -n "${PARTITION:-}" ]]; then
  common+=(--partition="$PARTITION")
fi
resources=(--cpus-per-task="${CPUS_PER_TASK:-8}")
if [[ "${GPUS_PER_TASK:-1}" != 0 ]]; then
  resources+=(--gpus-per-task="${GPUS_PER_TASK:-1}")
fi

# submit NAME DEPENDENCY ARRAY COMMAND: prints the job id (a stand-in one in a dry run).
submit() {
  local name="$1" dependency="$2" array="$3" command="$4"
  local args=(sbatch "${common[@]}" --job-name="$name")
  if [[ -n "$dependency" ]]; then args+=(--dependency="$dependency"); fi
  if [[ -n "$array" ]]; then
    args+=(--array="$array" "${resources[@]}" --output="$workdir/slurm/%x-%A_%a.out")
  else
    args+=(--output="$workdir/slurm/%x-%j.out")
  fi
  # exec: the task's shell becomes the study process, so that SLURM counts the task running
  # until that process has saved its checkpoint after a cancel (a shell that dies first on
  # SIGTERM leaves it running unseen where processes are tracked by parent, without cgroups).
  args+=(--wrap="cd $(printf '%q' "$PWD") && ${activate}exec $command")
  show "${args[@]}" >&2
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    echo "<$name>"
  else
    mkdir -p "$workdir/slurm"
    "${args[@]}"
  fi
}

run_command="$(printf '%q' "$python") -m clead_jax.study ${quoted_args}--run_index=\$SLURM_ARRAY_TASK_ID"
jobs=()  # the arrays submitted: the collection waits for all of them
if [[ "$first" != - ]]; then
  jobs+=("$(submit clead_study_runs "" "$first" "$run_command")")
fi
if [[ "$second" != - ]]; then
  dependency=""
  if [[ ${#jobs[@]} -gt 0 ]]; then dependency="afterany:${jobs[0]}"; fi
  jobs+=("$(submit clead_study_after_surrogates "$dependency" "$second" "$run_command")")
fi
collect_job=$(submit clead_study_collect "afterany:$(IFS=:; echo "${jobs[*]}")" "" \
  "$(printf '%q' "$python") -m clead_jax.study ${quoted_args}--collect")
echo "clead_jax: submitted runs ${first/#-/none}, then ${second/#-/none} (after their surrogates);" \
  "the collection: job $collect_job; outputs in $workdir/slurm/" >&2
