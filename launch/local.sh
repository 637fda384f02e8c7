#!/usr/bin/env bash
# Starts NUM_PROCESSES training processes on this machine, each with DEVICES_PER_PROCESS fake CPU
# devices: a multi-host run in miniature, for testing the multi-process code paths (gloo
# collectives, per-process input slices, Orbax checkpoints written by every process).
#
#   launch/local.sh NUM_PROCESSES DEVICES_PER_PROCESS -- MAIN_ARGS...
#   launch/local.sh 2 4 -- --config configs/digits.py --workdir runs/digits_2x4
#
# Process 0 prints the progress and writes the report; the others stay quiet. If a process fails,
# the others get SIGTERM (then SIGKILL after GRACE seconds) and the script exits with the failed
# process's status. A first SIGINT/SIGTERM to the script is passed on as SIGTERM (the run
# checkpoints and stops; the same command resumes it); a second one kills the processes.
#
# Environment:
#   DRY_RUN=1   print the commands, run nothing
#   PYTHON      interpreter (default: python3)
#   PORT        coordinator port on 127.0.0.1 (default: a free one)
#   GRACE       seconds between SIGTERM and SIGKILL once a process has failed (default: 10)
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
grace=${GRACE:-10}
if [[ -n "${PORT:-}" ]]; then
  port=$PORT
else
  port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi

xla_flags="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$devices_per_process"
main_args=$(printf ' %q' "$@")
commands=()
for ((i = 0; i < num_processes; i++)); do
  commands+=("JAX_PLATFORMS=cpu XLA_FLAGS=$(printf '%q' "$xla_flags") $python -m clead_jax.main \
--coordinator_address=127.0.0.1:$port --num_processes=$num_processes --process_id=$i$main_args")
done

if [[ "${DRY_RUN:-0}" == 1 ]]; then
  printf '%s &\n' "${commands[@]}"
  echo "wait"
  exit 0
fi

pids=()
kill_at=""  # once a process has failed: when the others still running get SIGKILL
signal_all() {
  for pid in "${pids[@]}"; do
    if [[ -n "$pid" ]]; then
      kill "-$1" "$pid" 2>/dev/null || true
    fi
  done
}
# First SIGINT/SIGTERM: pass SIGTERM on (the processes checkpoint and stop); second: SIGKILL.
interrupted=0
on_signal() {
  if [[ $interrupted -eq 1 ]]; then
    signal_all KILL
  fi
  interrupted=1
  signal_all TERM
}
trap on_signal INT TERM

for command in "${commands[@]}"; do
  bash -c "exec env $command" &
  pids+=($!)
done

status=0
while :; do
  running=0
  for i in "${!pids[@]}"; do
    pid=${pids[$i]}
    [[ -n "$pid" ]] || continue
    if kill -0 "$pid" 2>/dev/null; then
      running=1
      continue
    fi
    code=0
    wait "$pid" || code=$?
    pids[$i]=""
    if [[ $code -ne 0 && $status -eq 0 ]]; then
      status=$code
      echo "launch/local.sh: process $i exited with status $code; stopping the others" >&2
      signal_all TERM
      kill_at=$((SECONDS + grace))
    fi
  done
  [[ $running -eq 1 ]] || break
  if [[ -n "$kill_at" && $SECONDS -ge $kill_at ]]; then
    signal_all KILL
  fi
  sleep 1 || true  # a signal may cut the sleep short
done
exit "$status"
