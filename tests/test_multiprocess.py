"""Two real processes x 4 CPU devices (launch/local.sh) train digits C-LEAD end to end like one
process with 8 devices, write one report and one set of checkpoints, and resume from their own
checkpoint. Every run is a subprocess: XLA_FLAGS must be set before jax is imported."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.conftest import REPO

STEPS = 11  # one epoch of digits at the global batch of 128
ARGS = ["--config", "configs/digits.py", "--config.train.epochs=1", "--config.model.width=8",
        "--config.model.projection_dim=16", "--config.attack.steps=3",
        "--config.train.checkpoint_every=5", "--config.train.log_every=5",
        "--config.eval.attacks=pgd20", "--config.eval.curve_points=0",
        "--config.eval.num_examples=360"]
TIMEOUT_S = 300
# LLVM optimisation off: 5x faster compiles of the same HLO; these runs compute for seconds.
FAST_COMPILE = "--xla_backend_optimization_level=0"


def _run(command, env=None):
  env = {k: v for k, v in dict(os.environ, **(env or {})).items() if v is not None}
  proc = subprocess.run(command, cwd=REPO, env=env, text=True,
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=TIMEOUT_S,
                        check=False)
  return proc.returncode, proc.stdout


def _one_process_8_devices(workdir, cache):
  return _run([sys.executable, "-m", "clead_jax.main", "--workdir", workdir, *ARGS,
               f"--config.compilation_cache_dir={cache}"],
              env={"JAX_PLATFORMS": "cpu",
                   "XLA_FLAGS": f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}"})


def _two_processes_4_devices(workdir, cache, extra=()):
  return _run(["bash", "launch/local.sh", "2", "4", "--", "--workdir", workdir, *ARGS,
               f"--config.compilation_cache_dir={cache}", *extra],
              env={"PYTHON": sys.executable, "GRACE": "5", "XLA_FLAGS": FAST_COMPILE})


def _state(workdir, step):
  """The train state of checkpoint `step`, as numpy arrays (any topology)."""
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  with ocp.PyTreeCheckpointer() as checkpointer:
    tree = checkpointer.metadata(path).item_metadata.tree
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return checkpointer.restore(path, restore_args=restore_args)


def _max_abs_diff(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _accuracies(report):
  return {"clean": report["clean_accuracy"], **report["robust_accuracy"]}


def _report(workdir):
  with open(os.path.join(workdir, "report.json")) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """{'one': (workdir, output), 'two': ..., 'resumed': ...}."""
  root = tmp_path_factory.mktemp("multiprocess")
  cache = str(root / "xla_cache")
  result = {}
  one = str(root / "one_process")
  code, output = _one_process_8_devices(one, cache)
  assert code == 0, output[-5000:]
  result["one"] = (one, output)

  two = str(root / "two_processes")
  code, output = _two_processes_4_devices(two, cache)
  assert code == 0, output[-5000:]
  result["two"] = (two, output)

  # An interrupted run, as if killed after the checkpoint of step 5: the same workdir without
  # the later checkpoints and the report.
  resumed = str(root / "resumed")
  shutil.copytree(two, resumed)
  for step in (10, STEPS):
    shutil.rmtree(os.path.join(resumed, "checkpoints", str(step)))
  os.remove(os.path.join(resumed, "report.json"))
  code, output = _two_processes_4_devices(resumed, cache)
  assert code == 0, output[-5000:]
  result["resumed"] = (resumed, output)
  return result


def test_two_processes_write_one_report_and_one_set_of_checkpoints(runs):
  workdir, output = runs["two"]
  assert "clead_jax: 2 process(es), 8 device(s) (cpu); global batch 128, per-device batch 16" in output
  assert output.count("# Robustness report") == 1, output[-3000:]  # process 0 only
  assert _report(workdir)["steps"] == STEPS
  checkpoints = os.path.join(workdir, "checkpoints")
  assert sorted(int(s) for s in os.listdir(checkpoints) if s.isdigit()) == [5, 10, STEPS]
  assert os.listdir(checkpoints) == [s for s in os.listdir(checkpoints) if s.isdigit()]
  # Both processes took part in every save: one checkpoint holds both processes' writes.
  state_files = os.listdir(os.path.join(checkpoints, str(STEPS), "state"))
  assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(state_files), state_files


def test_two_processes_train_like_one_process(runs):
  one, two = runs["one"][0], runs["two"][0]
  assert "1 process(es), 8 device(s)" in runs["one"][1]
  for name, accuracy in _accuracies(_report(one)).items():
    assert abs(_accuracies(_report(two))[name] - accuracy) <= 0.01, name
  assert _max_abs_diff(_state(one, STEPS)["params"], _state(two, STEPS)["params"]) < 1e-4


def test_two_processes_resume_from_their_checkpoint(runs):
  (two, _), (resumed, output) = runs["two"], runs["resumed"]
  assert "clead_jax: resuming from step 5" in output, output[-3000:]
  assert _report(resumed)["steps"] == STEPS
  assert _max_abs_diff(_state(two, STEPS), _state(resumed, STEPS)) < 1e-5
  for name, accuracy in _accuracies(_report(two)).items():
    assert abs(_accuracies(_report(resumed))[name] - accuracy) <= 0.01, name


def test_a_failing_process_stops_the_launch(tmp_path):
  """A batch the 8 devices do not divide: both processes exit 2 with one clear line, and so
  does the launch script."""
  code, output = _two_processes_4_devices(str(tmp_path / "bad"), str(tmp_path / "cache"),
                                          extra=["--config.train.batch_size=100"])
  assert code == 2, output[-3000:]
  assert ("error: config.train.batch_size=100 is not a positive multiple of the 8 devices"
          in output), output[-3000:]


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
