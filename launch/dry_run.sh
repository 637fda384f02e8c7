# Sourced by the launch scripts that run commands on this machine (tpu_pod.sh, gke.sh,
# gke_study.sh, study_slurm.sh). slurm.sbatch keeps its own copy: sbatch runs a copy of the
# script, away from this folder.

# Prints a command after "+ ", quoted so that it can be pasted.
show() {
  local line="+" arg
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
      line+=" $arg"
    else
      line+=" '${arg//\'/\'\\\'\'}'"
    fi
  done
  echo "$line"
}

# Prints a command (show), then runs it unless DRY_RUN=1.
run() {
  show "$@"
  if [[ "${DRY_RUN:-0}" != 1 ]]; then
    "$@"
  fi
}

# The arguments as a YAML flow sequence of double-quoted strings (for a manifest's args).
yaml_list() {
  local out="" arg
  for arg in "$@"; do
    arg=${arg//\\/\\\\}
    arg=${arg//\"/\\\"}
    out+="${out:+, }\"$arg\""
  done
  echo "[$out]"
}

# fill TEMPLATE NAME...: the file with every ${NAME} replaced by that variable's value.
fill() {
  local text name
  text=$(<"$1")
  shift
  for name in "$@"; do
    text=${text//"\${$name}"/"${!name}"}
  done
  echo "$text"
}

# apply_manifest TEXT: kubectl apply -f - of TEXT; with DRY_RUN=1, TEXT and the command printed.
apply_manifest() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    echo "$1"
    echo "+ kubectl apply -f -   (the manifest above)"
  else
    echo "+ kubectl apply -f -"
    kubectl apply -f - <<<"$1"
  fi
}
