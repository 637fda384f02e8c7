# Sourced by the launch scripts that run commands on this machine (tpu_pod.sh, gke.sh).
# slurm.sbatch keeps its own copy: sbatch runs a copy of the script, away from this folder.

# Prints a command (quoted so that it can be pasted), then runs it unless DRY_RUN=1.
run() {
  local line="+" arg
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
      line+=" $arg"
    else
      line+=" '${arg//\'/\'\\\'\'}'"
    fi
  done
  echo "$line"
  if [[ "${DRY_RUN:-0}" != 1 ]]; then
    "$@"
  fi
}
