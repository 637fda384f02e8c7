#!/usr/bin/env bash
# Benchmarks the C-LEAD train step (PGD-10) on one NVIDIA GPU: ResNet-18 (width 64) and WRN-34-10,
# batch 128 and 512, bfloat16 and float32 compute, then PGD-20 on ResNet-18; one JSON per run.
# SUITE=compare (about 6 minutes) measures against PyTorch at its best and the reference AutoAttack:
# the train step against PyTorch eager (channels_last, autocast, cuDNN benchmark) and under
# torch.compile, AutoAttack standard ours against pyautoattack on the same weights and points, and
# one epoch of the real training loop on a SYNTHETIC 50,000-image TFDS cifar10 beside the bench's
# step rate for the same model, batch and dtype; last, the CPU table's AutoAttack bench on a trained
# model (BENCHMARKS.md): the digits quickstart trained here, ours against the reference on its
# weights and all 360 test points.
# SUITE=attacks times instead every evaluation attack of the README's attack-time table on one
# batch of 256 CIFAR-sized images for ResNet-18 (width 64): FGSM, PGD-20, PGD-100, CW, AutoAttack.
# Meant to finish within 8 minutes: ResNet-18 first, a deadline that skips what would not fit,
# and a per-run timeout. A run that fails (e.g. out of memory: WRN-34-10 at batch 512 in float32
# keeps ~1024 images of activations) is recorded and the next one starts.
#
#   launch/gpu_bench.sh [--dry-run] [OUT_DIR]      (default OUT_DIR: bench_gpu)
#
# Environment:
#   PYTHON          interpreter (default: python3)
#   SUITE           train (default) or attacks
#   BUDGET_S        total seconds (default: 480)
#   RUN_TIMEOUT_S   seconds per run (default: 150; 300 with SUITE=attacks)
#   COMPARE_TORCH=1 also time the PyTorch reference (ResNet-18 only; needs torch with CUDA)
set -uo pipefail

dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then
  dry_run=1
  shift
fi
out_dir=${1:-bench_gpu}
python=${PYTHON:-python3}
suite=${SUITE:-train}
budget_s=${BUDGET_S:-480}
if [[ $suite == attacks ]]; then
  run_timeout_s=${RUN_TIMEOUT_S:-300}
else
  run_timeout_s=${RUN_TIMEOUT_S:-150}
fi
torch_args=""
if [[ "${COMPARE_TORCH:-0}" == 1 ]]; then
  torch_args="--compare torch --torch-device cuda"
fi

# name|bench arguments, in the order they run: the most wanted first (the CIFAR-10 recipe's
# ResNet-18 at batch 128), alternating the models so that a short budget still covers both.
r18="--model resnet18 --width 64"
wrn="--model wide_resnet --depth 34 --widen 10"
runs=(
  "train_resnet18_b128_float32|train_step $r18 --batch 128 --pgd-steps 10 --dtype float32 --runs 5 $torch_args"
  "train_resnet18_b128_bfloat16|train_step $r18 --batch 128 --pgd-steps 10 --dtype bfloat16 --runs 5 $torch_args"
  "train_wrn34-10_b128_bfloat16|train_step $wrn --batch 128 --pgd-steps 10 --dtype bfloat16 --runs 5"
  "train_resnet18_b512_bfloat16|train_step $r18 --batch 512 --pgd-steps 10 --dtype bfloat16 --runs 5 $torch_args"
  "train_wrn34-10_b128_float32|train_step $wrn --batch 128 --pgd-steps 10 --dtype float32 --runs 5"
  "train_resnet18_b512_float32|train_step $r18 --batch 512 --pgd-steps 10 --dtype float32 --runs 5 $torch_args"
  "train_wrn34-10_b512_bfloat16|train_step $wrn --batch 512 --pgd-steps 10 --dtype bfloat16 --runs 5"
  "train_wrn34-10_b512_float32|train_step $wrn --batch 512 --pgd-steps 10 --dtype float32 --runs 5"
  "attacks_resnet18_b512_float32|attacks $r18 --batch 512 --attacks pgd20 --runs 5 $torch_args"
)
# AutoAttack runs every stage on the whole batch in the bench (an upper bound; see README).
attack_runs=(
  "attacks_resnet18_b256_fgsm_pgd_cw|attacks $r18 --batch 256 --attacks fgsm,pgd20,pgd100,cw --runs 3"
  "attacks_resnet18_b256_autoattack|attacks $r18 --batch 256 --attacks autoattack --runs 1"
)
# SUITE=compare, ordered by value; '!' rows run "$python ARGS" instead of the bench.
compare_runs=(
  "compare_resnet18_b512_bfloat16|train_step $r18 --batch 512 --pgd-steps 10 --dtype bfloat16 --runs 5 --compare torch,torch_compile --torch-device cuda"
  "compare_autoattack_resnet18_n1000|autoattack $r18 --num_examples 1000 --batch 500 --compare reference --torch-device cuda"
  "compare_resnet18_b512_float32|train_step $r18 --batch 512 --pgd-steps 10 --dtype float32 --runs 5 --compare torch --torch-device cuda"
  "compare_resnet18_b128_float32|train_step $r18 --batch 128 --pgd-steps 10 --dtype float32 --runs 5 --compare torch --torch-device cuda"
  "synthetic_cifar10|synthetic_cifar10 --data_dir $out_dir/tfds"
  "loop_resnet18_b128_float32|!-m clead_jax.main --config configs/cifar10.py --workdir $out_dir/loop --config.data.data_dir=$out_dir/tfds --config.data.download=false --config.train.epochs=1 --config.train.log_every=50 --config.eval.attacks=fgsm --config.eval.num_examples=256 --config.eval.curve_points=0"
  "loop_rate|loop_rate --workdir $out_dir/loop"
  "compare_resnet18_b128_bfloat16|train_step $r18 --batch 128 --pgd-steps 10 --dtype bfloat16 --runs 5 --compare torch --torch-device cuda"
  "compare_wrn34-10_b128_bfloat16|train_step $wrn --batch 128 --pgd-steps 10 --dtype bfloat16 --runs 5 --compare torch --torch-device cuda"
  "digits_for_autoattack|!-m clead_jax.main --config configs/digits.py --workdir $out_dir/digits --config.eval.attacks=fgsm --config.eval.curve_points=0"
  "compare_autoattack_digits_n360|autoattack --workdir $out_dir/digits --num_examples 360 --compare reference --torch-device cuda"
)
case "$suite" in
  train) ;;
  attacks) runs=("${attack_runs[@]}") ;;
  compare) runs=("${compare_runs[@]}"); budget_s=${BUDGET_S:-360} ;;
  *) echo "launch/gpu_bench.sh: SUITE=$suite is not train, attacks or compare" >&2; exit 2 ;;
esac

# The compilation cache makes a second invocation skip most compile time.
env_prefix="XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 JAX_COMPILATION_CACHE_DIR=$out_dir/jax_cache"

if [[ $dry_run == 1 ]]; then
  echo "mkdir -p $out_dir"
  for entry in "${runs[@]}"; do
    name=${entry%%|*}
    args=${entry#*|}
    if [[ $args == !* ]]; then
      echo "timeout $run_timeout_s env $env_prefix $python ${args#!}"
    else
      echo "timeout $run_timeout_s env $env_prefix $python -m clead_jax.bench $args --json $out_dir/$name.json"
    fi
  done
  exit 0
fi

mkdir -p "$out_dir"
"$python" -c 'import jax; assert jax.devices()[0].platform == "gpu", jax.devices()' || {
  echo "launch/gpu_bench.sh: JAX sees no GPU; install jax[cuda12] and check nvidia-smi" >&2
  exit 1
}
start=$(date +%s)
failed=0
for entry in "${runs[@]}"; do
  name=${entry%%|*}
  elapsed=$(( $(date +%s) - start ))
  left=$(( budget_s - elapsed ))
  if (( left < 30 )); then
    echo "launch/gpu_bench.sh: ${elapsed}s spent; skipping $name (budget ${budget_s}s)" >&2
    echo "{\"skipped\": \"time budget\"}" > "$out_dir/$name.json"
    continue
  fi
  limit=$(( left < run_timeout_s ? left : run_timeout_s ))
  echo "== $name (limit ${limit}s)"
  args=${entry#*|}
  if [[ $args == !* ]]; then
    # shellcheck disable=SC2086  # the arguments are meant to split into words
    timeout "$limit" env $env_prefix "$python" ${args#!} 2>&1 | tee "$out_dir/$name.log"
  else
    # shellcheck disable=SC2086
    timeout "$limit" env $env_prefix "$python" -m clead_jax.bench $args \
        --json "$out_dir/$name.json" 2>&1 | tee "$out_dir/$name.log"
  fi
  status=${PIPESTATUS[0]}
  if [[ $status -ne 0 ]]; then
    failed=$((failed + 1))
    echo "{\"failed\": $status, \"log\": \"$name.log\"}" > "$out_dir/$name.json"
    echo "launch/gpu_bench.sh: $name exited with status $status (124: timeout); see $out_dir/$name.log" >&2
  fi
done
echo "launch/gpu_bench.sh: done in $(( $(date +%s) - start ))s, $failed run(s) failed; results in $out_dir/"
grep -h '^| ' "$out_dir"/*.log 2>/dev/null || true
