#!/usr/bin/env bash
# A short C-LEAD run on CIFAR-10 for one GPU: ResNet-18, 10 epochs of C-LEAD (configs/cifar10.py,
# PGD-10 training attack, L-inf 8/255), then evaluation on the first 1,000 test images with
# PGD-20 and AutoAttack (standard). Sized to finish within 12 minutes on one H100.
#
#   launch/gpu_cifar10_short.sh [--dry-run] [WORKDIR]      (default WORKDIR: runs/gpu_cifar10_short)
#
# CIFAR-10 must be prepared for TFDS already when the machine is offline: set DATA_DIR to the
# directory holding cifar10/ (default: TFDS's own, ~/tensorflow_datasets). The training command
# runs under `timeout`: at TIME_LIMIT seconds it gets SIGTERM, saves a checkpoint and stops
# before the evaluation (exit 3); the same command resumes it. Once training is complete, running
# the script again only evaluates again.
#
# Environment:
#   EPOCHS        training epochs (default 10)
#   NUM_EXAMPLES  test images evaluated (default 1000)
#   ATTACKS       evaluation attacks (default pgd20,autoattack)
#   TIME_LIMIT    seconds allowed to the training-and-evaluation command (default 690)
#   DATA_DIR      TFDS data_dir (default: TFDS's)
#   PYTHON        interpreter (default python3)
set -euo pipefail

dry_run=0
workdir=runs/gpu_cifar10_short
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry_run=1 ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    -*) echo "$0: unknown option $arg" >&2; exit 2 ;;
    *) workdir=$arg ;;
  esac
done

python=${PYTHON:-python3}
epochs=${EPOCHS:-10}
num_examples=${NUM_EXAMPLES:-1000}
attacks=${ATTACKS:-pgd20,autoattack}
time_limit=${TIME_LIMIT:-690}

train_args=(
  -m clead_jax.main --config configs/cifar10.py --workdir "$workdir"
  --config.train.epochs="$epochs"
  --config.train.eval_every=0
  --config.train.checkpoint_every=390
  --config.data.download=false
  --config.eval.num_examples="$num_examples"
  --config.eval.attacks="$attacks"
  --config.eval.curve_points=5
)
if [[ -n "${DATA_DIR:-}" ]]; then
  train_args+=(--config.data.data_dir="$DATA_DIR")
fi

# Checks that fail in seconds rather than after training: a GPU is visible to JAX and every
# attack in ATTACKS is registered.
preflight_code="
import sys, jax
from clead_jax.evaluation import suite
device = jax.devices()[0]
print(f'preflight: {jax.device_count()} {device.platform} device(s): {device.device_kind}')
if device.platform != 'gpu':
    sys.exit('preflight: no GPU visible to JAX; install jax[cuda12] or check the driver')
missing = [a for a in sys.argv[1].split(',') if a not in suite.ATTACK_NAMES]
if missing:
    sys.exit(f'preflight: attack(s) {missing} are not in clead_jax.evaluation.suite.ATTACK_NAMES')
"

run() {
  printf '%q ' "$@"
  echo
  if [[ $dry_run == 0 ]]; then
    "$@"
  fi
}

echo "# preflight: a GPU is visible to JAX; the attacks $attacks are registered"
if [[ $dry_run == 0 ]]; then
  "$python" -c "$preflight_code" "$attacks"
fi
start=$SECONDS
status=0
run timeout --signal=TERM --kill-after=60 "$time_limit" "$python" "${train_args[@]}" || status=$?
if [[ $dry_run == 0 ]]; then
  echo "gpu_cifar10_short: $((SECONDS - start)) s for training and evaluation (exit $status)"
  if [[ $status == 124 ]]; then
    echo "gpu_cifar10_short: stopped at TIME_LIMIT=$time_limit s, before the report;" \
         "run the same command again to resume from the checkpoint" >&2
    exit 3
  elif [[ $status != 0 ]]; then
    exit "$status"
  fi
fi
run cat "$workdir/report.md"
