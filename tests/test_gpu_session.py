"""launch/gpu_session.sh: its dry run is the plan, in priority order and within the budget, and
its real run (the GPU and the heavy commands played by a stand-in interpreter, the script's own
timeouts, budget and rows for real) writes a row per step as it goes.

The stand-in interpreter (`_fake_python`) answers the script's GPU preflight as a GPU machine
would, writes a plausible result for each `python -m clead_jax.*` command, or fails or hangs where
a test asks it to; everything else (the rows, `bench table`) runs on this interpreter.
"""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO

SCRIPT = "launch/gpu_session.sh"
PRIORITY = ["step_resnet18_b512_bfloat16", "autoattack_resnet18_n1000", "synthetic_cifar10",
            "loop_resnet18_b512_bfloat16", "loop_rate", "fashion_mnist_study",
            "step_resnet18_b512_float32", "step_resnet18_b128_bfloat16",
            "step_resnet18_b128_float32", "step_wrn34-10_b128_bfloat16"]


def _dry_run(tmp_path, **env):
  env = dict(os.environ, WORK_DIR="WORK", IDX_DIR=str(tmp_path), **env)
  proc = subprocess.run(["bash", SCRIPT, "--dry-run", "OUT"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=60, check=False)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  return proc.stdout


def _plan(output):
  """[(name, allowance or None when dropped, argv)] from the '== N NAME ...' lines and the
  command under each; and the preflight's allowance."""
  steps, lines = [], output.splitlines()
  preflight = None
  for index, line in enumerate(lines):
    words = line.split()
    if line.startswith("== preflight"):
      preflight = int(words[2])
    elif line.startswith("== ") and words[1].isdigit():
      command = lines[index + 1]
      dropped = words[3] == "dropped"
      assert command.startswith("# " if dropped else "timeout "), (line, command)
      steps.append((words[2], None if dropped else int(words[3]),
                    shlex.split(command.removeprefix("# "))))
  return steps, preflight


def _module_args(argv, module):
  return argv[argv.index(module) + 1:]


def test_dry_run_is_the_priority_order_within_the_budget(tmp_path):
  from clead_jax.bench import cli  # pylint: disable=g-import-not-at-top
  output = _dry_run(tmp_path)
  steps, preflight = _plan(output)
  assert [name for name, _, _ in steps] == PRIORITY
  planned = [(name, allowance) for name, allowance, _ in steps if allowance is not None]
  assert planned[:2] == [("step_resnet18_b512_bfloat16", 160), ("autoattack_resnet18_n1000", 190)]
  assert all(allowance > 0 for _, allowance in planned)
  assert preflight + sum(a for _, a in planned) + 15 <= 420  # RESERVE_S is kept for the end
  for name, allowance, argv in steps:
    if allowance is not None:  # each command runs under its allowance
      assert argv[:3] == ["timeout", "--kill-after=10", str(allowance)], argv
    if "clead_jax.bench" in argv:
      args = cli._parser().parse_args(_module_args(argv, "clead_jax.bench"))  # pylint: disable=protected-access
      assert args.json == f"WORK/results/{name}.json"
      if args.command in ("train_step", "autoattack"):
        torch_env = "XLA_PYTHON_CLIENT_MEM_FRACTION=0.45"  # PyTorch shares the GPU
        assert torch_env in argv and args.torch_device == "cuda", argv

  # Row 1 is SUITE=compare's first row, the same measurement.
  compare = subprocess.run(["bash", "launch/gpu_bench.sh", "--dry-run", "X"], cwd=REPO, check=True,
                           capture_output=True, text=True,
                           env=dict(os.environ, SUITE="compare")).stdout
  first = next(shlex.split(line) for line in compare.splitlines() if "clead_jax.bench" in line)
  ours = cli._parser().parse_args(_module_args(steps[0][2], "clead_jax.bench"))  # pylint: disable=protected-access
  theirs = cli._parser().parse_args(_module_args(first, "clead_jax.bench"))  # pylint: disable=protected-access
  ours.json = theirs.json = None
  assert vars(ours) == vars(theirs)
  assert (ours.model, ours.batch, ours.dtype, ours.compare) == (
      "resnet18", 512, "bfloat16", "torch,torch_compile")

  autoattack = cli._parser().parse_args(_module_args(steps[1][2], "clead_jax.bench"))  # pylint: disable=protected-access
  assert autoattack.command == "autoattack" and autoattack.compare == "reference"
  assert autoattack.num_examples >= 1000


def test_loop_and_study_commands_are_valid_and_match_the_step(tmp_path):
  """The loop trains at row 1's model, batch and dtype on the TFDS data the synthetic step wrote;
  the study runs PGD-AT and C-LEAD before TRADES and stops itself before its step's timeout."""
  from clead_jax import config_tools  # pylint: disable=g-import-not-at-top
  (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"")
  steps, _ = _plan(_dry_run(tmp_path, BUDGET_S="1500", EPOCHS="2"))
  argv = {name: argv for name, _, argv in steps}
  allowance = {name: a for name, a, _ in steps}
  synthetic = _module_args(argv["synthetic_cifar10"], "clead_jax.bench")
  loop = _module_args(argv["loop_resnet18_b512_bfloat16"], "clead_jax.main")
  config = config_tools.load_config_file(os.path.join(REPO, loop[loop.index("--config") + 1]))
  for arg in loop:
    if arg.startswith("--config."):
      field, value = arg[len("--config."):].split("=", 1)
      config_tools.set_field(config, field, config_tools.parse_value(
          value, config_tools.get_field(config, field)))
  assert (config.model.name, config.train.batch_size, config.model.dtype) == (
      "resnet18", 512, "bfloat16")
  assert config.data.data_dir == synthetic[synthetic.index("--data_dir") + 1]
  assert config.data.download is False and config.train.epochs == 1
  rate = _module_args(argv["loop_rate"], "clead_jax.bench")
  assert rate[rate.index("--workdir") + 1] == loop[loop.index("--workdir") + 1]

  study = argv["fashion_mnist_study"]
  assert study[-2:] == ["launch/gpu_fashion_mnist.sh", "WORK/fashion_mnist"]
  settings = dict(word.split("=", 1) for word in study if re.match(r"[A-Z_]+=", word))
  methods = settings["METHODS"].split(",")
  assert methods.index("pgd_at") < methods.index("trades")
  assert methods.index("clead") < methods.index("trades")
  assert settings["IDX_DIR"] == str(tmp_path) and settings["EPOCHS"] == "2"
  assert 0 < int(settings["TIME_LIMIT"]) < allowance["fashion_mnist_study"]
  assert allowance["fashion_mnist_study"] == 1500 - 15 - 30 - (160 + 190 + 60 + 120 + 20)


def test_a_smaller_budget_drops_or_shortens_the_later_steps(tmp_path):
  plans = {}
  for budget in (1500, 420, 300, 200, 100):
    steps, preflight = _plan(_dry_run(tmp_path, BUDGET_S=str(budget)))
    assert [name for name, _, _ in steps] == PRIORITY  # every command, dropped or not
    plans[budget] = {name: a for name, a, _ in steps if a is not None}
    assert preflight + sum(plans[budget].values()) + 15 <= budget
  budgets = sorted(plans, reverse=True)
  for larger, smaller in zip(budgets, budgets[1:]):
    assert set(plans[smaller]) <= set(plans[larger])
    assert all(plans[smaller][name] <= plans[larger][name] for name in plans[smaller])
  assert list(plans[1500]) == PRIORITY[:6]  # the study takes what is left: 905 s
  # At the default budget the worst case (every step using its whole cap) covers rows 1 and 2;
  # the later steps run on what those leave.
  assert plans[420] == {"step_resnet18_b512_bfloat16": 160, "autoattack_resnet18_n1000": 190}
  assert plans[300] == {"step_resnet18_b512_bfloat16": 160, "autoattack_resnet18_n1000": 95}
  assert plans[200] == {"step_resnet18_b512_bfloat16": 155}  # shortened to what is left
  assert plans[100] == {"step_resnet18_b512_bfloat16": 55}


def test_dry_run_says_where_the_fashion_mnist_files_come_from(tmp_path):
  empty = _dry_run(tmp_path)
  assert "Fashion-MNIST: no IDX files" in empty
  (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"")
  found = _dry_run(tmp_path)
  assert f"Fashion-MNIST: IDX files in {tmp_path} (IDX_DIR)" in found
  assert "ml-collections==1.1.0" in found and "pyautoattack==0.2.0" in found


# --- real runs, with a stand-in interpreter --------------------------------------------------------

FAKE_PYTHON = r"""#!/usr/bin/env bash
# A GPU machine's python3, played: see tests/test_gpu_session.py.
real=%(real)s
echo "$*" >> "$FAKE_LOG"
call="$*"  # the whole command line, for FAKE_HANG (the argument loop below consumes "$@")
if [[ $1 == -c && $2 == *importlib.util* ]]; then  # the session's preflight: json, text, modules
  exec "$real" - "$3" "$4" "$5" <<'EOF'
import json, os, sys
json_path, text_path, modules = sys.argv[1:4]
missing = os.environ.get("FAKE_MISSING", "").split(",")
have = [m for m in modules.split(",") if m not in missing] + ["torch_cuda"]
json.dump({"platform": "gpu", "device_kind": "Fake GPU", "have": have}, open(json_path, "w"))
open(text_path, "w").write("gpu\n" + " ".join(have) + "\n")
EOF
fi
if [[ $1 == -c && $2 == *jax.devices* ]]; then  # gpu_fashion_mnist.sh's preflight
  echo "preflight: 1 gpu device(s): Fake GPU"; exit 0
fi
if [[ $1 != -m || $2 != clead_jax.* || "$*" == *"clead_jax.bench table"* ]]; then
  exec "$real" "$@"
fi
if [[ -n ${FAKE_FAIL:-} && "$*" == *$FAKE_FAIL* ]]; then
  echo "fake: $2 failed on purpose" >&2; exit 1
fi
json="" workdir=""
while (( $# )); do
  case $1 in --json) json=$2 ;; --workdir) workdir=$2 ;; esac
  shift
done
if [[ -n ${FAKE_HANG:-} && $call == *$FAKE_HANG* ]]; then
  if [[ -n $workdir ]]; then  # a study that had finished one run when it was stopped
    mkdir -p "$workdir"
    echo "| standard | fake |" > "$workdir/study.md"
    echo '{"runs": 1}' > "$workdir/study.json"
  fi
  echo $$ > "$FAKE_HANG_PID"
  exec sleep 600
fi
if [[ -n $json ]]; then
  cat > "$json" <<EOF
{"workload": "clead pgd10 fake", "jax_images_per_s": 100.0, "torch_images_per_s": 50.0,
 "ratio": 2.0, "jax_compile_s": 1.0, "flops_per_image": 1e9, "achieved_flops": 1e11,
 "peak_flops": 1e12}
EOF
fi
"""


@pytest.fixture
def fake_gpu(tmp_path):
  """(env, run, out): env runs the script with the stand-in interpreter; run(**more_env) runs
  it to the end and returns (process, rows, calls)."""
  path = tmp_path / "python3"
  path.write_text(FAKE_PYTHON % {"real": shlex.quote(sys.executable)})
  path.chmod(0o755)
  env = dict(os.environ, PYTHON=str(path), WORK_DIR=str(tmp_path / "work"),
             DEPS_DIR=str(tmp_path / "no_deps"), IDX_DIR=str(tmp_path / "idx"),
             FAKE_LOG=str(tmp_path / "calls.log"), FAKE_HANG_PID=str(tmp_path / "hang.pid"),
             MIN_STEP_S="3", RESERVE_S="2")
  (tmp_path / "idx").mkdir()
  (tmp_path / "idx" / "train-images-idx3-ubyte.gz").write_bytes(b"")
  out = tmp_path / "out"

  def run(**extra):
    proc = subprocess.run(["bash", SCRIPT, str(out)], cwd=REPO, env=dict(env, **extra),
                          capture_output=True, text=True, timeout=120, check=False)
    return proc, _rows(out), _calls(tmp_path)
  return env, run, out


def _rows(out):
  path = out / "rows.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _calls(tmp_path):
  path = tmp_path / "calls.log"
  return path.read_text().splitlines() if path.exists() else []


def test_each_step_writes_its_row_and_a_failure_or_timeout_does_not_stop_the_rest(fake_gpu):
  """AutoAttack fails, the loop fails (so its rate is skipped), the study hangs until its own
  TIME_LIMIT (fitted inside the step's allowance) stops it; the budget is spent by then, so the
  other step rows are skipped. Every step has its row, in order, and table.md the bench rows."""
  _, run, out = fake_gpu
  start = time.monotonic()
  # The study stops itself a quarter of its allowance (here at most 3 s) before the step's end,
  # under MIN_STEP_S: nothing runs after it.
  proc, rows, calls = run(BUDGET_S="16", MIN_STEP_S="5", FAKE_FAIL="clead_jax.bench autoattack",
                          FAKE_HANG="clead_jax.study")
  elapsed = time.monotonic() - start
  assert proc.returncode == 0, proc.stdout + proc.stderr
  status = {row["name"]: row["status"] for row in rows}
  assert [row["name"] for row in rows] == ["preflight"] + PRIORITY
  assert status == {
      "preflight": "ok", "step_resnet18_b512_bfloat16": "ok",
      "autoattack_resnet18_n1000": "failed", "synthetic_cifar10": "ok",
      "loop_resnet18_b512_bfloat16": "ok", "loop_rate": "ok",
      "fashion_mnist_study": "stopped_at_time_limit",
      "step_resnet18_b512_float32": "skipped", "step_resnet18_b128_bfloat16": "skipped",
      "step_resnet18_b128_float32": "skipped", "step_wrn34-10_b128_bfloat16": "skipped"}
  by_name = {row["name"]: row for row in rows}
  assert by_name["step_resnet18_b512_bfloat16"]["result"]["jax_images_per_s"] == 100.0
  assert by_name["autoattack_resnet18_n1000"]["exit"] == 1
  assert "failed on purpose" in " ".join(by_name["autoattack_resnet18_n1000"]["log_tail"])
  study = by_name["fashion_mnist_study"]
  assert study["result"] == {"runs": 1} and study["exit"] == 3
  assert 0 < study["seconds"] <= study["allowance_s"]
  assert (out / "fashion_mnist_study.md").read_text() == "| standard | fake |\n"
  assert by_name["step_wrn34-10_b128_bfloat16"]["result"] == {"skipped": "time budget"}
  assert sum(row["seconds"] for row in rows) <= 16 and elapsed < 16 + 30
  assert "| clead pgd10 fake | 100.00 | 50.00 | 2.00x |" in (out / "table.md").read_text()
  assert "gpu_session: done" in (out / "session.log").read_text()
  # The heavy commands ran in priority order; the study through gpu_fashion_mnist.sh.
  heavy = [line.split()[1:3] for line in calls if line.startswith("-m clead_jax.")]
  assert heavy[:5] == [["clead_jax.bench", "train_step"], ["clead_jax.bench", "autoattack"],
                       ["clead_jax.bench", "synthetic_cifar10"], ["clead_jax.main", "--config"],
                       ["clead_jax.bench", "loop_rate"]]
  assert ["clead_jax.prepare", "fashion_mnist"] in heavy and heavy[-1] == ["clead_jax.bench", "table"]


def test_a_missing_package_costs_nothing_and_its_time_goes_on(fake_gpu):
  """Without TensorFlow the loop and the study are skipped at once and the other step rows run;
  a failed loop skips its rate."""
  _, run, _ = fake_gpu
  proc, rows, _ = run(BUDGET_S="60", FAKE_MISSING="tensorflow")
  assert proc.returncode == 0, proc.stdout + proc.stderr
  by_name = {row["name"]: row for row in rows}
  for name in ("synthetic_cifar10", "loop_resnet18_b512_bfloat16", "fashion_mnist_study"):
    assert by_name[name]["status"] == "skipped" and by_name[name]["seconds"] == 0
    assert "tensorflow" in by_name[name]["result"]["skipped"]
  assert "did not finish" in by_name["loop_rate"]["result"]["skipped"]
  for name in PRIORITY[6:]:
    assert by_name[name]["status"] == "ok", by_name[name]

  proc, rows, _ = run(BUDGET_S="60", FAKE_FAIL="clead_jax.main")
  by_name = {row["name"]: row for row in rows[-len(PRIORITY):]}
  assert by_name["loop_resnet18_b512_bfloat16"]["status"] == "failed"
  assert by_name["loop_rate"]["status"] == "skipped"


def test_a_signal_keeps_the_finished_rows_and_stops_the_running_step(fake_gpu, tmp_path):
  env, _, out = fake_gpu
  proc = subprocess.Popen(["bash", SCRIPT, str(out)], cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL,
                          env=dict(env, BUDGET_S="300", FAKE_HANG="clead_jax.bench autoattack"))
  pid_file = tmp_path / "hang.pid"
  try:
    deadline = time.monotonic() + 60
    while not pid_file.exists() or not pid_file.read_text().strip():
      assert time.monotonic() < deadline and proc.poll() is None
      time.sleep(0.1)
    hung = int(pid_file.read_text())
    # The rows of the steps that finished are already written.
    assert [row["name"] for row in _rows(out)] == ["preflight", "step_resnet18_b512_bfloat16"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 143
  finally:
    proc.kill()
  rows = _rows(out)
  assert rows[-1]["name"] == "autoattack_resnet18_n1000" and rows[-1]["status"] == "cut_off"
  deadline = time.monotonic() + 15
  while os.path.exists(f"/proc/{hung}") and time.monotonic() < deadline:
    time.sleep(0.1)
  with pytest.raises(ProcessLookupError):
    os.kill(hung, 0)  # the step's process went with it


def test_no_gpu_runs_nothing(tmp_path):
  """On this machine's real interpreter JAX sees no GPU: one preflight row, exit 1."""
  out = tmp_path / "out"
  env = dict(os.environ, PYTHON=sys.executable, WORK_DIR=str(tmp_path / "work"),
             JAX_PLATFORMS="cpu")
  proc = subprocess.run(["bash", SCRIPT, str(out)], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=120, check=False)
  assert proc.returncode == 1, proc.stdout + proc.stderr
  rows = _rows(out)
  assert [(row["name"], row["status"]) for row in rows] == [("preflight", "no_gpu")]
  assert rows[0]["result"]["platform"] == "cpu"
  assert "JAX sees no GPU" in proc.stderr or "JAX sees no GPU" in (out / "session.log").read_text()
