#!/usr/bin/env bash
# The full-size Fashion-MNIST study on one GPU: standard, PGD-AT, TRADES and C-LEAD with the GPU
# recipe (configs/fashion_mnist.py: all 60,000 training images, TRADES' SmallCNN, PGD-10 at L-inf
# 0.1, 30 epochs), each evaluated on the whole 10,000-image test split with FGSM, PGD-20,
# PGD-100, CW, AutoAttack (standard) and the paper's transfer attack from the standard run.
#
#   launch/gpu_fashion_mnist.sh [--dry-run] [WORKDIR]     (default WORKDIR: runs/gpu_fashion_mnist)
#
# Offline machines: put the four original IDX files (Debian's dataset-fashion-mnist installs
# them) in IDX_DIR; the script prepares TFDS's fashion_mnist from them into DATA_DIR first. The
# study runs under `timeout`: at TIME_LIMIT seconds it gets SIGTERM, keeps what finished (each
# run's checkpoint, the finished runs' reports) and exits 3; the same command resumes it.
#
# Environment:
#   IDX_DIR     directory of the four IDX files (default: Debian's package's, if installed)
#   DATA_DIR    TFDS data_dir (default runs/tfds)
#   METHODS     methods of the study (default standard,pgd_at,trades,clead)
#   EPOCHS      training epochs (default: the recipe's 30)
#   NUM_EXAMPLES  test images evaluated (default -1: all 10,000)
#   TIME_LIMIT  seconds allowed to the study (default 3000)
#   PYTHON      interpreter (default python3)
set -euo pipefail

dry_run=0
workdir=runs/gpu_fashion_mnist
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry_run=1 ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    -*) echo "$0: unknown option $arg" >&2; exit 2 ;;
    *) workdir=$arg ;;
  esac
done

python=${PYTHON:-python3}
data_dir=${DATA_DIR:-runs/tfds}
methods=${METHODS:-standard,pgd_at,trades,clead}
num_examples=${NUM_EXAMPLES:--1}
time_limit=${TIME_LIMIT:-3000}

prepare_args=(-m clead_jax.prepare fashion_mnist --data_dir "$data_dir")
if [[ -n "${IDX_DIR:-}" ]]; then
  prepare_args+=(--from "$IDX_DIR")
fi
study_args=(
  -m clead_jax.study --config configs/fashion_mnist.py --methods "$methods" --seeds 1
  --workdir "$workdir"
  --config.data.data_dir="$data_dir"
  --config.data.download=false
  --config.eval.num_examples="$num_examples"
  --config.eval.attacks=fgsm,pgd20,pgd100,cw,autoattack,transfer_pgd3
)
if [[ -n "${EPOCHS:-}" ]]; then
  study_args+=(--config.train.epochs="$EPOCHS")
fi

run() {
  printf '%q ' "$@"
  echo
  if [[ $dry_run == 0 ]]; then
    "$@"
  fi
}

echo "# preflight: a GPU is visible to JAX"
if [[ $dry_run == 0 ]]; then
  "$python" -c "
import sys, jax
device = jax.devices()[0]
print(f'preflight: {jax.device_count()} {device.platform} device(s): {device.device_kind}')
if device.platform != 'gpu':
    sys.exit('preflight: no GPU visible to JAX; install jax[cuda12] or check the driver')
"
fi
run "$python" "${prepare_args[@]}"
start=$SECONDS
status=0
run timeout --signal=TERM --kill-after=120 "$time_limit" "$python" "${study_args[@]}" || status=$?
if [[ $dry_run == 0 ]]; then
  echo "gpu_fashion_mnist: $((SECONDS - start)) s for the study (exit $status)"
  if [[ $status == 124 ]]; then
    echo "gpu_fashion_mnist: stopped at TIME_LIMIT=$time_limit s; the finished runs are in" \
         "$workdir/study.md; run the same command again to resume" >&2
    exit 3
  elif [[ $status != 0 ]]; then
    exit "$status"
  fi
fi
run cat "$workdir/study.md"
