#!/usr/bin/env bash
# One GPU session, fully used: everything that waits on a GPU, in priority order, under one time
# budget (BUDGET_S, default 420 s), on one NVIDIA GPU.
#
#   1. the train step against PyTorch (the first row of `launch/gpu_bench.sh SUITE=compare`):
#      ResNet-18 w64, bfloat16, batch 512, PGD-10, against PyTorch eager and torch.compile;
#   2. AutoAttack standard, ours against the reference (pyautoattack) on the same random-weight
#      ResNet-18 and the same 1,000 CIFAR-shaped points (`bench autoattack --compare reference`);
#   3. the real training loop's images/s on a SYNTHETIC 50,000-image TFDS cifar10, at the model,
#      batch and dtype of row 1, so that `bench table` puts the loop beside the step;
#   4. the Fashion-MNIST GPU study (launch/gpu_fashion_mnist.sh) with TIME_LIMIT fitted to what
#      is left; methods standard (the transfer attack's surrogate, the study trains it first and it
#      is the cheapest), then PGD-AT, C-LEAD, TRADES;
#   5. as time allows, the other train-step rows of SUITE=compare.
# Each step gets min(its cap, the time left) under `timeout`; a step given less than MIN_STEP_S
# (or its cap, if smaller), or missing a package or the IDX files, is recorded as skipped at no
# cost, so its time goes on to the next; a failing step does not stop the later ones. JAX must
# see a GPU, else nothing runs (exit 1).
#
#   launch/gpu_session.sh [--dry-run] OUT    OUT: a directory; --dry-run prints the plan, runs nothing
#   launch/gpu_session.sh --fetch-deps      on a machine with internet: the wheels below into DEPS_DIR
#
# OUT, written as each step ends (a run cut off keeps what finished): rows.jsonl (one JSON line
# per step: name, status, exit, seconds, allowance_s, the step's result JSON, a failure's log
# tail), session.log (all output), fashion_mnist_study.md (the study's table, when it ran) and
# table.md (`bench table` of the results, at the end). Bulky files (TFDS data, checkpoints,
# compilation cache, per-step logs) go to WORK_DIR.
#
# What a bare GPU machine needs, and what the ones used so far hold (Python 3.12, jax/jaxlib
# 0.11.2 with the CUDA 13 plugin, flax, optax, orbax-checkpoint, chex, absl-py, torch 2.11 with
# CUDA, triton, numpy, scikit-learn, matplotlib; no network):
#   - ml-collections 1.1.0 (every step), pyautoattack 0.2.0 (step 2), tensorboardX 2.6.5 (steps 3
#     and 4) are missing there. All three are pure Python; `--fetch-deps` unpacks them into DEPS_DIR
#     (under 1 MB: pyautoattack's 42 MB wheel is almost all an example model, left out), and the
#     script puts DEPS_DIR first on PYTHONPATH. Bring DEPS_DIR along with the tree.
#   - tensorflow-datasets and TensorFlow (steps 3 and 4: the input pipeline reads TFDS through
#     TensorFlow) are missing there too, and TensorFlow's wheel (tensorflow-cpu 2.21.0, 274 MB)
#     is too large to bring along; without them steps 3 and 4 are recorded as skipped and their
#     time goes to step 5.
#   - Fashion-MNIST's four IDX files (30 MB): IDX_DIR, else Debian's dataset-fashion-mnist package
#     where installed (`dpkg -L dataset-fashion-mnist` lists them); not needed when DATA_DIR
#     already holds a prepared TFDS fashion_mnist.
#
# Environment:
#   BUDGET_S      seconds for the whole session (default 420)
#   MIN_STEP_S    a step given less than this is skipped (default 30)
#   RESERVE_S     seconds kept for the end (the table, timeouts' kill grace; default 15)
#   WORK_DIR      bulky files (default runs/gpu_session)
#   DATA_DIR      TFDS data_dir (default WORK_DIR/tfds)
#   DEPS_DIR      pure-Python packages put on PYTHONPATH (default runs/gpu_session_deps)
#   IDX_DIR       Fashion-MNIST IDX files (default: Debian's package's, if installed)
#   EPOCHS, NUM_EXAMPLES   passed to launch/gpu_fashion_mnist.sh (default: the GPU recipe's)
#   PYTHON        interpreter (default python3)
set -uo pipefail

dry_run=0
fetch_deps=0
out_dir=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry_run=1 ;;
    --fetch-deps) fetch_deps=1 ;;
    -h|--help) sed -n '2,/^set /{/^#/p}' "$0"; exit 0 ;;
    -*) echo "launch/gpu_session.sh: unknown option $arg" >&2; exit 2 ;;
    *) out_dir=$arg ;;
  esac
done

python=${PYTHON:-python3}
budget_s=${BUDGET_S:-420}
min_step_s=${MIN_STEP_S:-30}
reserve_s=${RESERVE_S:-15}
work=${WORK_DIR:-runs/gpu_session}
data_dir=${DATA_DIR:-$work/tfds}
deps_dir=${DEPS_DIR:-runs/gpu_session_deps}
preflight_cap_s=30
# The pure-Python packages the GPU machine lacks (see above), pinned to the versions tested here.
deps_wheels=(ml-collections==1.1.0 pyautoattack==0.2.0 tensorboardX==2.6.5)

if [[ $fetch_deps == 1 ]]; then
  wheels=$(mktemp -d)
  "$python" -m pip download -q --no-deps --only-binary=:all: -d "$wheels" "${deps_wheels[@]}" &&
  mkdir -p "$deps_dir" &&
  "$python" - "$wheels" "$deps_dir" <<'EOF'
import glob, os, sys, zipfile
wheels, target = sys.argv[1:]
for wheel in sorted(glob.glob(os.path.join(wheels, "*.whl"))):
  with zipfile.ZipFile(wheel) as z:
    z.extractall(target, [n for n in z.namelist() if "/examples/" not in n])
  print(f"gpu_session: unpacked {os.path.basename(wheel)} into {target}")
EOF
  status=$?
  rm -rf "$wheels"
  exit $status
fi

if [[ -z $out_dir ]]; then
  echo "usage: launch/gpu_session.sh [--dry-run] OUT   (or --fetch-deps; --help)" >&2
  exit 2
fi

# Where the Fashion-MNIST IDX files come from: IDX_DIR, else Debian's package.
idx_dir=${IDX_DIR:-}
idx_from="IDX_DIR"
if [[ -z $idx_dir ]]; then
  idx_file=$(dpkg -L dataset-fashion-mnist 2>/dev/null | grep -m1 'train-images-idx3-ubyte' || true)
  idx_dir=${idx_file%/*}
  idx_from="Debian's dataset-fashion-mnist"
fi
fmnist_source=""
if compgen -G "$data_dir/fashion_mnist/*/dataset_info.json" > /dev/null; then
  fmnist_source="prepared TFDS fashion_mnist in $data_dir"
elif [[ -n $idx_dir ]] && compgen -G "$idx_dir/train-images-idx3-ubyte*" > /dev/null; then
  fmnist_source="IDX files in $idx_dir ($idx_from)"
fi

# --- the plan: name|cap seconds (0: all that is left)|needs|command ------------------------------
# needs: Python modules, torch_cuda, fmnist (IDX files or a prepared dataset), or ok:STEP (that
# step finished). Commands starting with 'bench ' run `python -m clead_jax.bench ... --json`.
r18="--model resnet18 --width 64"
wrn="--model wide_resnet --depth 34 --widen 10"
step="train_step --pgd-steps 10 --runs 5 --torch-device cuda"
jax_deps="jax,flax,optax,orbax.checkpoint,ml_collections"
tfds_deps="$jax_deps,tensorflow,tensorflow_datasets"
loop_dir=$work/loop
loop_args="-m clead_jax.main --config configs/cifar10.py --workdir $loop_dir"
loop_args+=" --config.data.data_dir=$data_dir --config.data.download=false --config.train.epochs=1"
loop_args+=" --config.train.batch_size=512 --config.model.dtype=bfloat16 --config.train.log_every=10"
loop_args+=" --config.eval.attacks=fgsm --config.eval.num_examples=256 --config.eval.curve_points=0"
plan=(
  "step_resnet18_b512_bfloat16|160|$jax_deps,torch_cuda|bench $step $r18 --batch 512 --dtype bfloat16 --compare torch,torch_compile"
  "autoattack_resnet18_n1000|190|$jax_deps,torch_cuda,pyautoattack|bench autoattack $r18 --num_examples 1000 --batch 500 --compare reference --torch-device cuda"
  "synthetic_cifar10|60|$tfds_deps|bench synthetic_cifar10 --data_dir $data_dir"
  "loop_resnet18_b512_bfloat16|120|$tfds_deps,tensorboardX,ok:synthetic_cifar10|python $loop_args"
  "loop_rate|20|$jax_deps,ok:loop_resnet18_b512_bfloat16|bench loop_rate --workdir $loop_dir"
  "fashion_mnist_study|0|$tfds_deps,tensorboardX,fmnist|fmnist $work/fashion_mnist"
  "step_resnet18_b512_float32|100|$jax_deps,torch_cuda|bench $step $r18 --batch 512 --dtype float32 --compare torch"
  "step_resnet18_b128_bfloat16|100|$jax_deps,torch_cuda|bench $step $r18 --batch 128 --dtype bfloat16 --compare torch"
  "step_resnet18_b128_float32|100|$jax_deps,torch_cuda|bench $step $r18 --batch 128 --dtype float32 --compare torch"
  "step_wrn34-10_b128_bfloat16|150|$jax_deps,torch_cuda|bench $step $wrn --batch 128 --dtype bfloat16 --compare torch"
)

# JAX takes 90% of the GPU's memory up front; a step that also runs PyTorch on it leaves PyTorch
# half. The compilation cache lets a rerun skip most compile time.
env_for() {
  local fraction=0.9
  [[ $1 == *torch_cuda* ]] && fraction=0.45
  echo "XLA_PYTHON_CLIENT_MEM_FRACTION=$fraction JAX_COMPILATION_CACHE_DIR=$work/jax_cache"
}

# The command of a plan entry, as words (the caller splits them).
command_for() {
  local name=$1 spec=$2 allow=$3
  case "$spec" in
    bench\ *) echo "$python -m clead_jax.bench ${spec#bench } --json $work/results/$name.json" ;;
    python\ *) echo "$python ${spec#python }" ;;
    fmnist\ *)
      # The study stops itself (SIGTERM, keeping finished runs) a quarter of the allowance, at most
      # 90 s, before the step's own timeout: the dataset's preparation and the stop fit in that.
      local grace=$(( allow / 4 < 90 ? allow / 4 : 90 )) time_limit="<fitted>"
      (( allow > 0 )) && time_limit=$(( allow - grace ))
      local fm_env="METHODS=standard,pgd_at,clead,trades TIME_LIMIT=$time_limit"
      fm_env+=" DATA_DIR=$data_dir PYTHON=$python"
      [[ -n $idx_dir ]] && fm_env+=" IDX_DIR=$idx_dir"
      [[ -n ${EPOCHS:-} ]] && fm_env+=" EPOCHS=$EPOCHS"
      [[ -n ${NUM_EXAMPLES:-} ]] && fm_env+=" NUM_EXAMPLES=$NUM_EXAMPLES"
      echo "env $fm_env bash launch/gpu_fashion_mnist.sh ${spec#fmnist }" ;;
  esac
}

if [[ $dry_run == 1 ]]; then
  echo "# budget ${budget_s} s: preflight up to ${preflight_cap_s} s, ${reserve_s} s kept for the end;"
  echo "# each step gets min(its cap, the time left), skipped under ${min_step_s} s; allowances below"
  echo "# assume every earlier step uses all of its own (a step that ends early leaves its time on)."
  echo "# deps: ${deps_wheels[*]} from DEPS_DIR=$deps_dir ($( [[ -d $deps_dir ]] && echo present || echo 'absent: run --fetch-deps' ))"
  echo "# Fashion-MNIST: ${fmnist_source:-no IDX files (set IDX_DIR or install dataset-fashion-mnist): the study would be skipped}"
  echo "== preflight ${preflight_cap_s} s"
  left=$(( budget_s - reserve_s - preflight_cap_s ))
  index=0 planned=" "
  for entry in "${plan[@]}"; do
    IFS='|' read -r name cap needs spec <<< "$entry"
    index=$((index + 1))
    allow=$(( cap == 0 || cap > left ? left : cap ))
    floor=$(( cap == 0 || cap > min_step_s ? min_step_s : cap ))
    after=""
    for need in ${needs//,/ }; do
      [[ $need == ok:* && $planned != *" ${need#ok:} "* ]] && after=${need#ok:}
    done
    if [[ -n $after ]]; then
      echo "== $index $name dropped (needs $after, dropped above)"
      echo "# $(env_for "$needs") $(command_for "$name" "$spec" 0)"
      continue
    elif (( allow < floor || allow <= 0 )); then
      echo "== $index $name dropped (${left} s left at worst; runs if earlier steps leave time)"
      echo "# $(env_for "$needs") $(command_for "$name" "$spec" 0)"
      continue
    fi
    left=$(( left - allow ))
    planned+="$name "
    echo "== $index $name ${allow} s (cap $( (( cap > 0 )) && echo "$cap s" || echo 'what is left'); needs ${needs})"
    echo "timeout --kill-after=10 $allow env $(env_for "$needs") $(command_for "$name" "$spec" "$allow")"
  done
  echo "== end: $python -m clead_jax.bench table $work/results/*.json > $out_dir/table.md"
  exit 0
fi

# --- the run ------------------------------------------------------------------------------------
mkdir -p "$out_dir" "$work/results" "$work/logs" || exit 1
rows=$out_dir/rows.jsonl
exec > >(tee -a "$out_dir/session.log") 2>&1
if [[ -d $deps_dir ]]; then
  export PYTHONPATH="$(cd "$deps_dir" && pwd)${PYTHONPATH:+:$PYTHONPATH}"
fi

# Appends one row to rows.jsonl: name status exit seconds allowance [result.json] [log].
record() {
  "$python" - "$rows" "$@" <<'EOF' || echo "{\"name\": \"$1\", \"status\": \"$2\"}" >> "$rows"
import json, os, sys
rows, name, status, code, seconds, allowance = sys.argv[1:7]
result_path, log_path = (sys.argv[7:] + ["", ""])[:2]
row = {"name": name, "status": status, "exit": int(code) if code else None,
       "seconds": int(seconds), "allowance_s": int(allowance), "result": None}
if result_path and os.path.exists(result_path):
  try:
    with open(result_path) as f:
      row["result"] = json.load(f)
  except ValueError as e:
    row["result"] = {"unreadable": str(e)}
if status != "ok" and log_path and os.path.exists(log_path):
  with open(log_path, errors="replace") as f:
    row["log_tail"] = f.read().splitlines()[-20:]
with open(rows, "a") as f:
  f.write(json.dumps(row) + "\n")
EOF
}

current="" current_pid="" current_start=0 current_allow=0
on_signal() {
  trap - TERM INT
  if [[ -n $current_pid ]]; then
    # The step's timeout and tee; timeout passes the signal on to the step's processes.
    pkill -TERM -P "$current_pid" 2>/dev/null || kill -TERM "$current_pid" 2>/dev/null
    record "$current" cut_off 143 $(( SECONDS - current_start )) "$current_allow" \
        "$work/results/$current.json" "$work/logs/$current.log"
  fi
  echo "gpu_session: stopped by a signal during ${current:-the bookkeeping}; rows in $rows" >&2
  exit 143
}
trap on_signal TERM INT

# Runs the words "$@" as step $current under timeout, its output also in its log; returns the
# step's exit status (124: timed out). In the background, so that a signal reaches on_signal.
run_step() {
  local allow=$1; shift
  ( timeout --kill-after=10 "$allow" "$@" 2>&1 | tee "$work/logs/$current.log"
    exit "${PIPESTATUS[0]}" ) &
  current_pid=$!
  wait "$current_pid"
  local status=$?
  current_pid=""
  return $status
}

echo "== preflight (up to ${preflight_cap_s} s)"
current=preflight current_start=$SECONDS current_allow=$preflight_cap_s
preflight_py='
import importlib.util, json, sys
json_path, text_path, modules = sys.argv[1:4]
have = []
for name in modules.split(","):
  try:
    if importlib.util.find_spec(name) is not None:
      have.append(name)
  except (ImportError, ValueError):
    pass
info = {"have": have}
try:
  import jax
  device = jax.devices()[0]
  info.update(platform=device.platform, device_kind=device.device_kind,
              device_count=jax.device_count(), jax=jax.__version__)
except Exception as e:  # no JAX or no backend: reported, and the session stops
  info.update(platform=None, error=f"{type(e).__name__}: {e}")
if "torch" in have:
  import torch
  info.update(torch=torch.__version__, torch_cuda=torch.cuda.is_available())
  if info["torch_cuda"]:
    have.append("torch_cuda")
print(json.dumps(info))
with open(json_path, "w") as f:
  json.dump(info, f, indent=2)
with open(text_path, "w") as f:
  f.write(str(info["platform"]) + "\n" + " ".join(have) + "\n")
'
modules="jax,flax,optax,orbax.checkpoint,ml_collections,torch,pyautoattack,tensorflow"
modules+=",tensorflow_datasets,tensorboardX"
rm -f "$work/preflight.txt"
run_step "$preflight_cap_s" "$python" -c "$preflight_py" "$work/preflight.json" \
    "$work/preflight.txt" "$modules"
status=$?
platform=$(sed -n 1p "$work/preflight.txt" 2>/dev/null)
have=" $(sed -n 2p "$work/preflight.txt" 2>/dev/null) "
[[ -n $fmnist_source ]] && have+="fmnist "
echo "gpu_session: Fashion-MNIST from ${fmnist_source:-nowhere (no IDX files, no prepared dataset)}"
if [[ $status != 0 || $platform != gpu ]]; then
  record preflight no_gpu "$status" $(( SECONDS - current_start )) "$preflight_cap_s" \
      "$work/preflight.json" "$work/logs/preflight.log"
  echo "gpu_session: JAX sees no GPU (platform ${platform:-unknown}); nothing run" >&2
  exit 1
fi
record preflight ok 0 $(( SECONDS - current_start )) "$preflight_cap_s" "$work/preflight.json"

done_ok=" "
for entry in "${plan[@]}"; do
  IFS='|' read -r name cap needs spec <<< "$entry"
  current=$name current_start=$SECONDS
  result=$work/results/$name.json
  rm -f "$result"
  left=$(( budget_s - reserve_s - SECONDS ))
  allow=$(( cap == 0 || cap > left ? left : cap ))
  floor=$(( cap == 0 || cap > min_step_s ? min_step_s : cap ))  # a short step needs only its cap
  missing=""
  for need in ${needs//,/ }; do
    if [[ $need == ok:* ]]; then
      [[ $done_ok == *" ${need#ok:} "* ]] || missing+=" ${need#ok:} (did not finish)"
    elif [[ $have != *" $need "* ]]; then
      missing+=" $need"
    fi
  done
  if [[ -n $missing ]]; then
    echo "== $name skipped: missing$missing"
    echo "{\"skipped\": \"missing:$missing\"}" > "$result"
    record "$name" skipped "" 0 0 "$result"
    continue
  fi
  if (( allow < floor || allow <= 0 )); then
    echo "== $name skipped: ${left} s left of the budget"
    echo "{\"skipped\": \"time budget\"}" > "$result"
    record "$name" skipped "" 0 0 "$result"
    continue
  fi
  current_allow=$allow
  echo "== $name (allowance ${allow} s, $(( budget_s - SECONDS )) s of the budget left)"
  # shellcheck disable=SC2046  # the words are meant to split
  run_step "$allow" env $(env_for "$needs") $(command_for "$name" "$spec" "$allow")
  status=$?
  case $status in
    0) state=ok; done_ok+="$name " ;;
    3) state=stopped_at_time_limit ;;  # gpu_fashion_mnist.sh: finished runs kept, resumable
    124|137) state=timeout ;;
    *) state=failed ;;
  esac
  if [[ $name == fashion_mnist_study ]]; then
    result=$work/fashion_mnist/study.json
    cp "$work/fashion_mnist/study.md" "$out_dir/fashion_mnist_study.md" 2>/dev/null
  fi
  record "$name" "$state" "$status" $(( SECONDS - current_start )) "$allow" "$result" \
      "$work/logs/$name.log"
  if [[ $state != ok && $result == "$work/results/$name.json" && ! -f $result ]]; then
    echo "{\"failed\": $status, \"log\": \"$name.log\"}" > "$result"  # for the table
  fi
  echo "gpu_session: $name: $state (exit $status) in $(( SECONDS - current_start )) s"
done
current=""

echo "== table"
"$python" -m clead_jax.bench table "$work"/results/*.json > "$out_dir/table.md" 2>&1 ||
  echo "gpu_session: bench table failed; rows.jsonl holds every result" >&2
echo "gpu_session: done in ${SECONDS} s of ${budget_s} s; rows in $rows"
