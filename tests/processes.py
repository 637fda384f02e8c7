"""Commands run as a user runs them, in real processes: what tests/test_commands.py,
tests/test_signals.py and tests/soak_signals.py share (a tiny digits PGD-AT run, the environment,
a workdir's bytes, stderr without its progress bars)."""

import hashlib
import json
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO

# A tiny digits PGD-AT run: something stays robust, so AutoAttack has several stages to run.
TINY = ["--config.method=pgd_at", "--config.model.width=8", "--config.model.projection_dim=16",
        "--config.train.epochs=2", "--config.attack.steps=2", "--config.train.log_every=5",
        "--config.train.checkpoint_every=5", "--config.eval.num_examples=100",
        "--config.eval.curve_points=0"]
ALL_ATTACKS = "--config.eval.attacks=fgsm,pgd20,pgd100,cw"


# LLVM optimisation off: these tiny runs compute for seconds and compile for longer, and the same
# HLO compiles several times faster (every run of a test gets the same flags, so runs compared
# with each other compute alike).
FAST_COMPILE = "--xla_backend_optimization_level=0"


def env(xla_flags=FAST_COMPILE):
  return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags)


def main_command(workdir, *extra, cache=None):
  """python -m clead_jax.main of the tiny run (no compilation cache unless `cache`)."""
  return [sys.executable, "-m", "clead_jax.main", "--config", "configs/digits.py",
          "--workdir", str(workdir), *TINY,
          f"--config.compilation_cache_dir={cache or ''}", *extra]


def run(argv, timeout=600):
  return subprocess.run(argv, cwd=REPO, env=env(), capture_output=True, text=True,
                        timeout=timeout)


def start(argv, xla_flags=FAST_COMPILE):
  return subprocess.Popen(argv, cwd=REPO, env=env(xla_flags), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def finished_run(workdir, cache):
  """Trains the tiny run with FGSM, PGD-20, PGD-100 and CW in its report; returns its workdir."""
  result = run(main_command(workdir, ALL_ATTACKS, cache=cache))
  assert result.returncode == 0, result.stderr[-3000:]
  return str(workdir)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  """A compilation cache shared by the tests of one module."""
  return str(tmp_path_factory.mktemp("xla_cache"))


@pytest.fixture(scope="module")
def finished(tmp_path_factory, cache):  # pylint: disable=redefined-outer-name
  """A finished tiny run with FGSM, PGD-20, PGD-100 and CW in its report, once per module."""
  return finished_run(tmp_path_factory.mktemp("finished"), cache)


def digest(workdir):
  """Every file of the workdir but the command log and the lock file (which names the process
  writing the workdir), by its hash."""
  found = {}
  for root, _, files in os.walk(workdir):
    for name in files:
      if name in ("clead_jax.log", "clead_jax.lock"):
        continue
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        found[os.path.relpath(path, workdir)] = hashlib.sha256(f.read()).hexdigest()
  return found


def read_report(workdir):
  with open(os.path.join(workdir, "report.json")) as f:
    return json.load(f)


def without_timings(report):
  drop = ("train_time_s", "eval_time_s", "compile_time_s", "attack_time_s", "measured")
  return {k: v for k, v in report.items() if k not in drop}


def messages(stderr):
  """stderr's lines without the progress bars training and evaluation draw there."""
  return [l for l in stderr.replace("\r", "\n").splitlines()
          if l.strip() and "it/s" not in l and "s/it" not in l]


def wait_for(predicate, process, timeout=300):
  deadline = time.time() + timeout
  while not predicate():
    assert process.poll() is None, process.communicate()[1][-3000:]
    assert time.time() < deadline, "timed out"
    time.sleep(0.05)
