"""Preemption and bad input, with real processes and real signals: kill -9 and resume is
bit-identical, SIGTERM checkpoints and exits 0, a corrupt latest checkpoint falls back, and every
bad input is one line with the earlier checkpoints intact."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests import processes
from tests.conftest import REPO

pytestmark = pytest.mark.slow  # real processes

TIMING_KEYS = ("train_time_s", "eval_time_s", "compile_time_s", "attack_time_s", "measured")


def _args(workdir, cache_dir, *extra):
  return [sys.executable, "-m", "clead_jax.main", "--config", "configs/digits.py",
          "--workdir", str(workdir), "--config.model.width=8", "--config.model.projection_dim=16",
          "--config.train.epochs=3", "--config.attack.steps=3", "--config.train.log_every=1",
          "--config.train.checkpoint_every=4", "--config.eval.attacks=pgd20",
          "--config.eval.num_examples=60", "--config.eval.curve_points=0",
          f"--config.compilation_cache_dir={cache_dir}", *extra]


def _env():
  return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", XLA_FLAGS=processes.FAST_COMPILE)


def _run(workdir, cache_dir, *extra, timeout=300):
  return subprocess.run(_args(workdir, cache_dir, *extra), cwd=REPO, env=_env(),
                        capture_output=True, text=True, timeout=timeout)


def _start(workdir, cache_dir, *extra):
  return subprocess.Popen(_args(workdir, cache_dir, *extra), cwd=REPO, env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _logged_step(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  lines = [l for l in open(path).read().splitlines() if l.strip()]
  return json.loads(lines[-1])["step"] if lines else 0


def _checkpoint_steps(workdir):
  directory = os.path.join(workdir, "checkpoints")
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit()) if os.path.isdir(
      directory) else []


def _wait_for_step(process, workdir, step, timeout=240):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if process.poll() is not None:
      return False
    if _logged_step(workdir) >= step and _checkpoint_steps(workdir):
      return True
    time.sleep(0.02)
  raise TimeoutError(f"step {step} not reached")


def _final_params(workdir):
  manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                                  item_names=("state", "meta"))
  state = manager.restore(manager.latest_step(),
                          args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  manager.close()
  return state


def _report_without_timings(workdir):
  report = json.load(open(os.path.join(workdir, "report.json")))
  return {k: v for k, v in report.items() if k not in TIMING_KEYS}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("xla_cache"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache_dir):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  result = _run(workdir, cache_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  return str(workdir)


def test_kill_9_at_random_steps_then_resume_is_bit_identical(tmp_path, cache_dir, uninterrupted):
  seed = random.randrange(10**6)
  rng = random.Random(seed)
  total = _checkpoint_steps(uninterrupted)[-1]
  kill_steps = sorted(rng.sample(range(5, total - 2), 2))  # after the first checkpoint (step 4)
  workdir = str(tmp_path / "killed")
  for kill_step in kill_steps:
    process = _start(workdir, cache_dir)
    if _wait_for_step(process, workdir, kill_step):
      process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, (seed, kill_steps, process.stdout.read()[-2000:])
  result = _run(workdir, cache_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "resuming from step" in result.stdout
  want, got = _final_params(uninterrupted), _final_params(workdir)
  for a, b in zip(jax_leaves(want), jax_leaves(got)):
    np.testing.assert_array_equal(a, b, err_msg=f"seed {seed}, kill steps {kill_steps}")
  assert _report_without_timings(workdir) == _report_without_timings(uninterrupted)
  steps = [json.loads(l)["step"] for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert steps == sorted(set(steps))  # lines after the checkpoint were dropped, not duplicated


def jax_leaves(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree.leaves(tree)


def test_sigterm_checkpoints_the_current_step_and_exits_0(tmp_path, cache_dir):
  workdir = str(tmp_path / "sigterm")
  process = _start(workdir, cache_dir)
  assert _wait_for_step(process, workdir, 6)
  process.send_signal(signal.SIGTERM)
  output, _ = process.communicate(timeout=120)
  assert process.returncode == 0, output[-2000:]
  stopped = _checkpoint_steps(workdir)[-1]
  assert f"stopped by SIGTERM; checkpoint saved at step {stopped} in" in output, output[-2000:]
  assert stopped % 4 != 0 or stopped >= 6  # a checkpoint at the step it stopped, not only every 4
  assert not os.path.exists(os.path.join(workdir, "report.json"))
  result = _run(workdir, cache_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"resuming from step {stopped}" in result.stdout


def test_corrupt_latest_checkpoint_falls_back_and_deletes_nothing(tmp_path, cache_dir,
                                                                  uninterrupted):
  import shutil  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "corrupt"
  shutil.copytree(uninterrupted, workdir)
  steps = _checkpoint_steps(workdir)
  latest = workdir / "checkpoints" / str(steps[-1]) / "state"
  for root, _, files in os.walk(latest):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")
  result = _run(workdir, cache_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"checkpoint {workdir}/checkpoints/{steps[-1]} cannot be read" in result.stdout
  assert f"resuming from step {steps[-2]}" in result.stdout
  assert any(d.startswith(f"corrupt-{steps[-1]}-") for d in os.listdir(workdir / "checkpoints"))
  assert _report_without_timings(workdir) == _report_without_timings(uninterrupted)


def test_every_checkpoint_corrupt_warns_once_each_and_starts_from_step_0(tmp_path, cache_dir,
                                                                         uninterrupted):
  """Every checkpoint unreadable: one warning per checkpoint (each moved aside, none deleted), one
  line saying training starts again from step 0, no library tail, and the run it then does gives
  the uninterrupted report."""
  import shutil  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "all_corrupt"
  shutil.copytree(uninterrupted, workdir)
  steps = _checkpoint_steps(workdir)
  assert len(steps) >= 2
  for step in steps:
    for root, _, files in os.walk(workdir / "checkpoints" / str(step) / "state"):
      for name in files:
        with open(os.path.join(root, name), "wb") as f:
          f.write(b"garbage")
  result = _run(workdir, cache_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  output = result.stdout + result.stderr
  for index, step in enumerate(steps):
    said = [l for l in output.splitlines()
            if f"checkpoint {workdir}/checkpoints/{step} cannot be read" in l]
    assert len(said) == 1, said  # once, not twice
    assert said[0].endswith("falling back to the previous one" if index else
                            "no earlier checkpoint"), said[0]
  restart = [l for l in output.splitlines() if "training starts again from step 0" in l]
  assert len(restart) == 1 and restart[0].startswith("warning: no checkpoint in"), output[-3000:]
  assert "pybind" not in output and "Traceback" not in output and "resuming from" not in output
  kept = os.listdir(workdir / "checkpoints")
  assert all(any(d.startswith(f"corrupt-{step}-") for d in kept) for step in steps), kept
  assert _report_without_timings(workdir) == _report_without_timings(uninterrupted)


def _assert_one_line_error(result, *fragments):
  assert result.returncode not in (0, None), result.stdout[-2000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: "), result.stderr[-3000:]
  for fragment in fragments:
    assert fragment in last, last


@pytest.fixture()
def finished(tmp_path, uninterrupted):
  """A copy of a finished run, and its checkpoint files as they were."""
  import shutil  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "finished"
  shutil.copytree(uninterrupted, workdir)
  before = {p: open(p, "rb").read() for p in _files(workdir / "checkpoints")}
  return workdir, before


def _files(directory):
  return sorted(os.path.join(r, f) for r, _, fs in os.walk(directory) for f in fs)


def _intact(workdir, before):
  assert {p: open(p, "rb").read() for p in _files(workdir / "checkpoints")} == before


def test_resume_with_a_changed_model_field_is_refused(finished, cache_dir):
  workdir, before = finished
  result = _run(workdir, cache_dir, "--config.loss.lam=0.5")
  _assert_one_line_error(result, "config.loss.lam: checkpoint 1.0, now 0.5")
  _intact(workdir, before)


def test_checkpoint_of_a_different_model_is_refused(finished, cache_dir):
  workdir, before = finished
  result = _run(workdir, cache_dir, "--config.model.width=12")
  _assert_one_line_error(result, "different model")
  _intact(workdir, before)


def test_override_of_the_wrong_type(finished, cache_dir):
  workdir, before = finished
  result = _run(workdir, cache_dir, "--config.train.epochs=three")
  _assert_one_line_error(result, "--config.train.epochs=three")
  _intact(workdir, before)


def test_unknown_dataset(finished, cache_dir):
  workdir, before = finished
  _assert_one_line_error(_run(workdir, cache_dir, "--config.data.name=imagenet21k"),
                         "config.data.name='imagenet21k' is unknown")
  _intact(workdir, before)


def test_dataset_that_cannot_be_downloaded_offline(tmp_path, cache_dir):
  result = _run(tmp_path / "run", cache_dir, "--config.data.name=svhn_cropped",
                "--config.model.name=resnet18", f"--config.data.data_dir={tmp_path / 'tfds'}",
                "--config.data.download=False")
  _assert_one_line_error(result, "svhn_cropped", "config.data.data_dir")


def test_workdir_that_is_not_writable(tmp_path, cache_dir):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  _assert_one_line_error(_run(blocker / "run", cache_dir), "--workdir", "not a writable directory")


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, cache_dir):
  workdir = tmp_path / "nan_run"
  # The warm-up keeps the first steps finite; the learning rate, rising to 300, then blows up.
  result = _run(workdir, cache_dir, "--config.train.learning_rate=300",
                "--config.train.warmup_epochs=3")
  _assert_one_line_error(result, "non-finite", "last good checkpoint")
  kept = _checkpoint_steps(workdir)
  assert kept and f"(step {kept[-1]}) is kept" in result.stderr
  for step in kept:  # every checkpoint kept is finite
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                                    item_names=("state", "meta"))
    state = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))["state"]
    manager.close()
    assert all(np.all(np.isfinite(x)) for x in jax_leaves(state["params"]))


@pytest.fixture()
def small_disk(tmp_path):
  """A 4 MiB tmpfs: a real file system that really fills up."""
  mount_point = tmp_path / "small_disk"
  mount_point.mkdir()
  result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
  if result.returncode != 0:
    pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip()}); needs root")
  yield mount_point
  subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_disk_full_during_a_save_is_one_line_and_keeps_earlier_checkpoints(small_disk):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from clead_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from clead_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  state = {"params": {"w": jnp.arange(50_000, dtype=jnp.float32)}}  # 200 kB
  checkpointer = checkpointing.Checkpointer(str(small_disk), keep=3)
  checkpointer.save(1, state, {"config": {}})
  checkpointer.wait()
  with open(small_disk / "filler", "wb") as f:  # leave less room than one checkpoint
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    f.write(b"\0" * max(free - 50_000, 0))
  with pytest.raises(UserError) as error:
    checkpointer.save(2, jax.tree.map(lambda x: x + 1, state), {"config": {}})
    checkpointer.wait()
  message = str(error.value)
  assert "\n" not in message and "saving checkpoint 2" in message and "free disk space" in message
  assert "[1]" in message
  os.remove(small_disk / "filler")
  fresh = checkpointing.Checkpointer(str(small_disk), keep=3)
  assert fresh.latest_step() == 1
  restored, _ = fresh.restore(jax.eval_shape(lambda: state))
  np.testing.assert_array_equal(restored["params"]["w"], state["params"]["w"])
