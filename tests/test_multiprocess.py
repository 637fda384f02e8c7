"""Two real processes x 4 CPU devices (launch/local.sh) train digits C-LEAD end to end like one
process with 8 devices, write one report and one set of checkpoints, and resume from their own
checkpoint.

The one-process side checks the two-process run step by step: from each of its checkpoints it
takes one step on 8 devices and compares with the next checkpoint, and it evaluates the final
checkpoint. (Comparing two independent runs is no test: this training is chaotic, and round-off
alone moves final accuracies by more than 0.01; see tests/test_parallel.py.) Every run is a
subprocess, as XLA_FLAGS must be set before jax is imported; run as
`python -m tests.test_multiprocess WORKDIR OUT.json`, this file is the one-process side.
"""

import json
import os
import re
import signal
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests import processes
from tests.conftest import REPO

pytestmark = pytest.mark.slow  # real processes

STEPS = 11  # one epoch of digits at the global batch of 128
OVERRIDES = {"train.epochs": 1, "model.width": 8, "model.projection_dim": 16, "attack.steps": 3,
             "train.checkpoint_every": 1, "train.keep_checkpoints": STEPS, "train.log_every": 5,
             "eval.attacks": "pgd20", "eval.curve_points": 0, "eval.num_examples": 360}
ARGS = ["--config", "configs/digits.py"] + [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
TIMEOUT_S = 300
FAST_COMPILE = processes.FAST_COMPILE  # these runs compute for seconds and compile for longer


def _run(command, env=None):
  env = {k: v for k, v in dict(os.environ, **(env or {})).items() if v is not None}
  proc = subprocess.run(command, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT, timeout=TIMEOUT_S, check=False)
  return proc.returncode, proc.stdout


def _two_processes_4_devices(workdir, cache):
  return _run(["bash", "launch/local.sh", "2", "4", "--", "--workdir", workdir, *ARGS,
               f"--config.compilation_cache_dir={cache}"],
              env={"PYTHON": sys.executable, "GRACE": "5", "XLA_FLAGS": FAST_COMPILE})


def _state(workdir, step):
  """The train state of checkpoint `step` as numpy arrays, whatever topology saved it."""
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  with ocp.PyTreeCheckpointer() as checkpointer:
    tree = checkpointer.metadata(path).item_metadata.tree
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return checkpointer.restore(path, restore_args=restore_args)


def _max_abs_diff(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _report(workdir):
  with open(os.path.join(workdir, "report.json")) as f:
    return json.load(f)


def _accuracies(report):
  return {"clean": report["clean_accuracy"], **report["robust_accuracy"]}


def _one_process_check(workdir, out_path):
  """On 8 devices of one process: each step of the run in `workdir` from its checkpoint, and the
  evaluation of its last checkpoint. Writes {'step_diffs': [...], 'accuracies': {...}}."""
  # pylint: disable=g-import-not-at-top
  from clead_jax import checkpointing
  from clead_jax import input_pipeline
  from clead_jax import methods
  from clead_jax import parallel
  from clead_jax import train
  from clead_jax import train_state
  from clead_jax.evaluation import suite
  from clead_jax.evaluation import workdir as workdir_lib
  from tests.conftest import digits_config
  # pylint: enable=g-import-not-at-top
  assert jax.process_count() == 1 and jax.device_count() == 8, jax.devices()
  config = digits_config(**OVERRIDES)
  dataset = input_pipeline.load_dataset(config.data)
  model = train_state.build(config, dataset)
  network, schedule, tx = model.network, model.schedule, model.tx
  mesh = parallel.make_mesh()
  data = parallel.batch_sharding(mesh)
  abstract_state = train_state.abstract_state(model, config.seed, mesh)
  checkpointer = checkpointing.Checkpointer(workdir, STEPS)
  assert checkpointer.all_steps() == list(range(1, STEPS + 1)), checkpointer.all_steps()
  step_fn = train.jit_train_step(train.make_train_step(
      methods.Context(network, config), methods.METHODS[config.method], tx, schedule), mesh)
  batches = input_pipeline.train_batches(dataset, config.train.batch_size, config.seed, 0, data)
  state = train_state.init_state(model, config.seed, mesh)
  step_diffs = []
  for step in range(1, STEPS + 1):
    state, _ = step_fn(state, next(batches))
    saved, _ = checkpointer.restore(abstract_state, step)
    step_diffs.append(_max_abs_diff(state, saved))
    state = saved  # the next step starts from the two-process state
  scratch = os.path.join(os.path.dirname(out_path), "one_process_evaluation")
  result = workdir_lib.evaluate_state(
      config, scratch, network, state.variables, STEPS, dataset, mesh,
      attack_names=suite.parse_attack_names(config.eval.attacks),
      num_examples=workdir_lib.num_test_examples(config.eval.num_examples, dataset, "n"),
      checkpoint_info={"step": STEPS, "rule": "test"})
  checkpointer.close()
  with open(out_path, "w") as f:
    json.dump({"step_diffs": step_diffs, "accuracies": _accuracies(result)}, f)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """{'two': (workdir, output), 'one': check results, 'resumed': (workdir, output)}."""
  root = tmp_path_factory.mktemp("multiprocess")
  cache = str(root / "xla_cache")
  result = {}
  two = str(root / "two_processes")
  code, output = _two_processes_4_devices(two, cache)
  assert code == 0, output[-5000:]
  result["two"] = (two, output)

  check = str(root / "one_process_check.json")
  code, output = _run([sys.executable, "-m", "tests.test_multiprocess", two, check],
                      env={"JAX_PLATFORMS": "cpu", "XLA_FLAGS":
                           f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}"})
  assert code == 0, output[-5000:]
  with open(check) as f:
    result["one"] = json.load(f)

  # An interrupted run, as if killed after the checkpoint of step 5: the same workdir without
  # the later checkpoints and the report.
  resumed = str(root / "resumed")
  shutil.copytree(two, resumed)
  for step in range(6, STEPS + 1):
    shutil.rmtree(os.path.join(resumed, "checkpoints", str(step)))
  for name in os.listdir(resumed):
    if name.startswith("report"):
      os.remove(os.path.join(resumed, name))
  code, output = _two_processes_4_devices(resumed, cache)
  assert code == 0, output[-5000:]
  result["resumed"] = (resumed, output)
  return result


def test_two_processes_write_one_report_and_one_set_of_checkpoints(runs):
  workdir, output = runs["two"]
  assert ("clead_jax: 2 process(es), 8 device(s) (cpu); global batch 128, per-device batch 16"
          in output)
  assert output.count("# Robustness report") == 1, output[-3000:]  # process 0 only
  assert _report(workdir)["steps"] == STEPS
  checkpoints = os.path.join(workdir, "checkpoints")
  assert sorted(int(s) for s in os.listdir(checkpoints)) == list(range(1, STEPS + 1))
  # Both processes took part in each save: one checkpoint holds both processes' writes.
  state_files = os.listdir(os.path.join(checkpoints, str(STEPS), "state"))
  assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(state_files), state_files


def test_every_two_process_step_is_the_one_process_step(runs):
  step_diffs = runs["one"]["step_diffs"]
  assert len(step_diffs) == STEPS
  assert max(step_diffs) < 1e-4, step_diffs


def test_two_process_report_matches_one_process_evaluation(runs):
  two = _accuracies(_report(runs["two"][0]))
  one = runs["one"]["accuracies"]
  # Each example's attack key comes from its index, and evaluation reduces nothing across
  # devices: the same parameters give the same report on 2 x 4 devices as on 1 x 8.
  assert set(one) == set(two) == {"clean", "pgd20"}
  assert two == one


def test_two_processes_resume_from_their_checkpoint(runs):
  (two, _), (resumed, output) = runs["two"], runs["resumed"]
  assert "clead_jax: resuming from step 5" in output, output[-3000:]
  assert _report(resumed)["steps"] == STEPS
  for name, accuracy in _accuracies(_report(two)).items():
    assert abs(_accuracies(_report(resumed))[name] - accuracy) <= 0.01, name
  # Same topology, same steps from the same checkpoint: the same training.
  assert _max_abs_diff(_state(two, STEPS), _state(resumed, STEPS)) < 1e-4
  with open(os.path.join(two, "metrics.jsonl")) as f:
    uninterrupted = [json.loads(line) for line in f]
  with open(os.path.join(resumed, "metrics.jsonl")) as f:
    after_resume = [json.loads(line) for line in f]
  assert [m["step"] for m in after_resume] == [m["step"] for m in uninterrupted]
  for a, b in zip(uninterrupted, after_resume):
    assert abs(a["loss"] - b["loss"]) < 1e-4, (a, b)


def _pid_of(process_id, workdir):
  """The pid of the clead_jax.main process with --process_id=process_id training in workdir."""
  for entry in os.listdir("/proc"):
    if not entry.isdigit():
      continue
    try:
      with open(f"/proc/{entry}/cmdline", "rb") as f:
        argv = f.read().decode().split("\0")
    except OSError:
      continue
    if "clead_jax.main" in argv and f"--process_id={process_id}" in argv and workdir in argv:
      return int(entry)
  return None


def test_sigterm_to_one_process_stops_both_at_one_step_then_resumes(tmp_path):
  """SIGTERM to process 1 alone: both processes checkpoint the same step and exit 0 (none waits
  forever in a collective); the same command then resumes from that step and finishes."""
  workdir, cache = str(tmp_path / "run"), str(tmp_path / "xla_cache")
  epochs = 3  # 33 steps: still training when the signal comes, soon after step 5
  command = ["bash", "launch/local.sh", "2", "4", "--", "--workdir", workdir, *ARGS,
             f"--config.train.epochs={epochs}", "--config.train.checkpoint_every=1000",
             f"--config.compilation_cache_dir={cache}"]
  env = dict(os.environ, PYTHON=sys.executable, GRACE="5", XLA_FLAGS=FAST_COMPILE)
  proc = subprocess.Popen(command, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)
  try:
    # Training has started once metrics.jsonl has its first line (step 5).
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + TIMEOUT_S
    while not (os.path.exists(metrics) and os.path.getsize(metrics) > 0):
      assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-5000:]
      time.sleep(0.2)
    pid = _pid_of(1, workdir)
    assert pid is not None
    os.kill(pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=TIMEOUT_S)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 0, output[-5000:]
  # JAX's coordination service takes SIGTERM in a multi-process run and announces a preemption to
  # every process; if our handler saw it first, the line names the process.
  stopped = re.findall(r"stopped by (?:SIGTERM to process 1|a preemption notice \(SIGTERM to one "
                       r"of the processes\)); checkpoint saved at step (\d+)", output)
  assert len(stopped) == 1, output[-5000:]  # printed by process 0 only
  step = int(stopped[0])
  assert 5 <= step < epochs * STEPS, output[-5000:]
  assert os.listdir(os.path.join(workdir, "checkpoints")) == [str(step)]
  assert not os.path.exists(os.path.join(workdir, "report.json"))

  code, output = _run(command, env={"PYTHON": sys.executable, "GRACE": "5",
                                    "XLA_FLAGS": FAST_COMPILE})
  assert code == 0, output[-5000:]
  assert f"clead_jax: resuming from step {step}" in output, output[-3000:]
  assert _report(workdir)["steps"] == epochs * STEPS


def test_settings_come_from_flags_then_environment(monkeypatch):
  from clead_jax import distributed  # pylint: disable=g-import-not-at-top
  from clead_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  for name in distributed.ENV_VARS:
    monkeypatch.delenv(name, raising=False)
  assert distributed.resolve() == (None, None, None)
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
  monkeypatch.setenv("JAX_PROCESS_ID", "3")
  assert distributed.resolve() == ("10.0.0.1:1234", 4, 3)
  assert distributed.resolve("host:99", 2, 1) == ("host:99", 2, 1)
  with pytest.raises(UserError, match="is not HOST:PORT"):
    distributed.resolve("10.0.0.1")
  with pytest.raises(UserError, match=r"--process_id=2 must be in \[0, --num_processes=2\)"):
    distributed.resolve(num_processes=2, process_id=2)
  monkeypatch.setenv("JAX_NUM_PROCESSES", "four")
  with pytest.raises(UserError, match="JAX_NUM_PROCESSES='four' is not an integer"):
    distributed.resolve()


def test_incomplete_multiprocess_settings_are_one_line_errors(tmp_path):
  code, output = _run([sys.executable, "-m", "clead_jax.main", "--workdir", str(tmp_path),
                       "--config", "configs/digits.py", "--num_processes=2", "--process_id=0"],
                      env={"JAX_PLATFORMS": "cpu", "JAX_COORDINATOR_ADDRESS": None})
  assert code == 2, output[-3000:]
  errors = [line for line in output.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "--coordinator_address" in errors[0], output[-3000:]


if __name__ == "__main__":
  _one_process_check(sys.argv[1], sys.argv[2])
