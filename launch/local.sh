#!/usr/bin/env bash
# Starts NUM_PROCESSES training processes on this machine, each with DEVICES_PER_PROCESS fake CPU
# devices: a multi-host run in miniature, for testing the multi-process code paths (gloo
# collectives, per-process input slices, Orbax checkpoints written by all processes).
#
#   launch/local.sh NUM_PROCESSES DEVICES_PER_PROCESS -- MAIN_ARGS...
#   launch/local.sh 2 4 -- --config configs/digits.py --workdir runs/digits_2x4
#
# Process 0 prints the progress and writes the report; the others stay quiet. If one process
# fails, the others are stopped and the script exits with that process's status.
#
# Environment:
#   DRY_RUN=1   print the commands, run nothing
#   PYTHON      interpreter (default: python3)
#   PORT        coordinator port on 127.0.0.1 (default: a free one)
set -euo pipefail

usage() {
  echo "usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS -- MAIN_ARGS..." >&2
  exit 2
}

[[ $# -ge 2 ]] || usage
num_processes=$1
devices_per_process=$2
shift 2
[[ "$num_processes" =~ ^[1-9][0-9]*$ && "$devices_per_process" =~ ^[1-9][0-9]*$ ]] || usage
if [[ $# -gt 0 && "$1" == "--" ]]; then
  shift
fi

python=${PYTHON:-python3}
if [[ -n "${PORT:-}" ]]; then
  port=$PORT
elif [[ "${DRY_RUN:-0}" == 1 ]]; then
  port=12355
else
  port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi

commands=()
for ((i = 0; i < num_processes; i++)); do
  commands+=("env JAX_PLATFORMS=cpu XLA_FLAGS='${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$devices_per_process' \
$python -m clead_jax.main --coordinator_address=127.0.0.1:$port --num_processes=$num_processes \
--process_id=$i $(printf '%q ' "$@")")
done

if [[ "${DRY_RUN:-0}" == 1 ]]; then
  printf '%s &\n' "${commands[@]}"
  echo "wait"
  exit 0
fi

pids=()
stop_all() {
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
}
trap 'stop_all; exit 130' INT TERM

for command in "${commands[@]}"; do
  bash -c "exec $command" &
  pids+=($!)
done

status=0
for _ in "${pids[@]}"; do
  code=0
  wait -n || code=$?
  if [[ $code -ne 0 && $status -eq 0 ]]; then
    status=$code
    echo "launch/local.sh: a process exited with status $code; stopping the others" >&2
    stop_all
  fi
done
exit "$status"
