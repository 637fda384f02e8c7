"""A newcomer's first hour without a traceback (issue 27), in real processes: the base install holds
what the README's routes import; one writer per workdir (two processes started at once, a lock
that dies with its process); every path a command writes is checked before the work (a genuinely
read-only directory: a read-only bind mount in a private user and mount namespace); a config file
that fails to import and crosscheck without PyTorch are one line; evaluate at another epsilon."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import tomllib

import numpy as np
import pytest

from tests import processes
from tests.conftest import REPO
from tests.processes import cache, finished  # pylint: disable=unused-import  (fixtures)

EVALUATE = [sys.executable, "-m", "clead_jax.evaluate"]


def _one_line(result):
  lines = processes.messages(result.stderr)
  assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (
      result.returncode, result.stderr[-3000:])
  assert "Traceback" not in result.stderr
  return lines[0]


def _copy(finished, tmp_path, name="run"):  # pylint: disable=redefined-outer-name
  workdir = str(tmp_path / name)
  shutil.copytree(finished, workdir)
  return workdir


# --- 1. the base install ----------------------------------------------------------------------------

def test_the_base_install_holds_what_prepare_imports():
  """`pip install -e .` alone must hold what `prepare` imports: TFDS's dataset builder imports
  importlib_resources without depending on it."""
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)["project"]
  names = {d.split(";")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower()
           for d in project["dependencies"]}
  assert "importlib_resources" in names or "importlib-resources" in names, names
  with open(os.path.join(REPO, ".ci", "run")) as f:
    ci = f.read()
  # .ci/run proves the routes in a fresh venv of the base install before the suite.
  assert "-m venv" in ci and re.search(r"pip install -q (--no-compile )?-e \.$",
                                      ci.replace('"', ""), re.MULTILINE)
  assert "clead_jax.prepare fashion_mnist" in ci and "clead_jax.evaluate" in ci


# --- 2. one writer per workdir ----------------------------------------------------------------------

_HOLD = textwrap.dedent("""
    import sys, time
    from clead_jax import workdir_lock
    workdir_lock.enable()
    workdir_lock.acquire(sys.argv[1])
    print("held", flush=True)
    time.sleep(60)
""")


def test_the_lock_names_its_holder_and_dies_with_it(tmp_path):
  from clead_jax import workdir_lock  # pylint: disable=g-import-not-at-top
  from clead_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    workdir_lock.enable()
    with pytest.raises(UserError, match=rf"in use by another process \(pid {holder.pid}: "):
      workdir_lock.acquire(str(tmp_path))
    holder.send_signal(signal.SIGKILL)  # killed: the kernel drops the lock
    holder.wait()
    workdir_lock.acquire(str(tmp_path))
    workdir_lock.acquire(str(tmp_path))  # held by this process already: fine
  finally:
    holder.kill()
    workdir_lock._enabled = False  # pylint: disable=protected-access


@pytest.mark.slow
def test_two_evaluations_at_once_one_runs_the_other_is_one_line(finished, tmp_path):
  workdir = _copy(finished, tmp_path)
  before = processes.read_report(workdir)
  both = [processes.start(EVALUATE + ["--workdir", workdir, f"--attacks={attack}"])
          for attack in ("pgd100,cw", "cw,pgd100")]
  results = [(p.pid, *p.communicate(timeout=600)) for p in both]
  results = [(pid, p.returncode, out, err) for (pid, out, err), p in zip(results, both)]
  codes = sorted(code for _, code, _, _ in results)
  assert codes == [0, 2], [(code, err[-2000:]) for _, code, _, err in results]
  winner = next(r for r in results if r[1] == 0)
  loser = next(r for r in results if r[1] == 2)
  lines = processes.messages(loser[3])
  assert len(lines) == 1 and "Traceback" not in loser[3], loser[3][-3000:]
  assert lines[0].startswith(f"error: --workdir {workdir} is in use by another process "
                             f"(pid {winner[0]}: python -m clead_jax.evaluate"), lines[0]
  after = processes.read_report(workdir)
  assert after["measured"]["fgsm"] == before["measured"]["fgsm"]
  assert "clead_jax.evaluate" in after["measured"]["cw"]["command"]


@pytest.mark.slow
def test_two_trainings_at_once_one_trains_the_other_is_one_line(tmp_path, cache):  # pylint: disable=redefined-outer-name
  workdir = tmp_path / "run"
  argv = processes.main_command(workdir, "--config.eval.attacks=fgsm", cache=cache)
  both = [processes.start(argv) for _ in range(2)]
  results = [(p.pid, *p.communicate(timeout=600), p.returncode) for p in both]
  codes = sorted(r[3] for r in results)
  assert codes == [0, 2], [(r[3], r[2][-2000:]) for r in results]
  winner = next(r for r in results if r[3] == 0)
  loser = next(r for r in results if r[3] == 2)
  lines = processes.messages(loser[2])
  assert len(lines) == 1 and lines[0].startswith(
      f"error: --workdir {workdir} is in use by another process (pid {winner[0]}: "
      "python -m clead_jax.main"), loser[2][-3000:]
  steps = [json.loads(l)["step"]
           for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert steps == sorted(set(steps)), steps  # every step once
  assert len(os.listdir(workdir / "tensorboard")) == 1


# --- 3. writability before the work -----------------------------------------------------------------

# A read-only bind mount of $RO in a private user and mount namespace (root ignores permission
# bits, so chmod would prove nothing when the tests run as root), then the command.
_READ_ONLY = 'mount --bind "$RO" "$RO" && mount -o remount,bind,ro "$RO" || exit 77; exec "$@"'


def _run_read_only(directory, argv, timeout=600):
  if not shutil.which("unshare"):
    pytest.skip("needs util-linux's unshare for a read-only bind mount")
  result = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "bash", "-c",
                           _READ_ONLY, "read_only", *argv], cwd=REPO,
                          env=dict(processes.env(), RO=str(directory)), capture_output=True,
                          text=True, timeout=timeout)
  if result.returncode == 77:
    pytest.skip(f"no read-only bind mount here: {result.stderr.strip()[-200:]}")
  return result


def _with_autoattack(workdir):
  """A report with (stand-in) AutoAttack flags, as crosscheck needs: PGD-100's, one stage."""
  path = os.path.join(workdir, "report_examples.npz")
  with np.load(path) as saved:
    arrays = dict(saved)
  arrays["autoattack"] = arrays["autoattack__apgd_ce"] = arrays["pgd100"]
  np.savez_compressed(path, **arrays)
  return workdir


@pytest.mark.slow
@pytest.mark.parametrize("command", ["evaluate", "crosscheck", "export", "study", "prepare"])
def test_an_unwritable_path_is_one_line_before_any_work(finished, tmp_path, cache, command):  # pylint: disable=redefined-outer-name
  workdir = _with_autoattack(_copy(finished, tmp_path))
  read_only = tmp_path / "read_only"
  read_only.mkdir()
  argv, named = {
      "evaluate": (EVALUATE + ["--workdir", workdir, "--attacks=fgsm"], "--workdir"),
      "crosscheck": ([sys.executable, "-m", "clead_jax.crosscheck", "--workdir", workdir,
                      "--num_examples=10"], "--workdir"),
      "export": ([sys.executable, "-m", "clead_jax.export", "--workdir", workdir, "--out",
                  str(read_only / "model.pt")], "--out"),
      "study": ([sys.executable, "-m", "clead_jax.study", "--config", "configs/digits.py",
                 "--methods", "pgd_at", "--seeds", "1", "--workdir", str(read_only / "study"),
                 *[a for a in processes.TINY if not a.startswith("--config.method")],
                 "--config.eval.attacks=fgsm", f"--config.compilation_cache_dir={cache}"],
                "--workdir"),
      "prepare": ([sys.executable, "-m", "clead_jax.prepare", "fashion_mnist", "--data_dir",
                   str(read_only / "tfds")], "--data_dir"),
  }[command]
  if command in ("evaluate", "crosscheck"):
    read_only = workdir  # the workdir itself is read-only
  if command in ("crosscheck", "export"):
    pytest.importorskip("torch")
    pytest.importorskip("pyautoattack")
  if command == "prepare" and not os.path.isdir("/usr/share/datasets/fashion-mnist"):
    pytest.skip("needs Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist)")
  before = processes.digest(workdir)
  started = time.time()
  line = _one_line(_run_read_only(read_only, argv))
  assert line.startswith(f"error: {named} {argv[argv.index(named) + 1]}") and (
      "is not writable (read-only file system)" in line), line
  assert time.time() - started < 60  # before the work (which takes minutes on this machine)
  assert processes.digest(workdir) == before


# --- 4. one line for the rest -----------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("body,line,error", [
    ("def get_config(:\n  pass\n", 1, "SyntaxError: invalid syntax"),
    ("import ml_collections\n\n\ndef get_config():\n  return {}['model']\n", 5, "KeyError: 'model'"),
    ("raise ValueError('no such recipe')\n", 1, "ValueError: no such recipe"),
], ids=["syntax error", "exception in get_config", "exception on import"])
def test_a_config_file_that_fails_to_import_is_one_line_naming_the_line(tmp_path, body, line,
                                                                        error):
  config = tmp_path / "broken.py"
  config.write_text(body)
  result = processes.run([sys.executable, "-m", "clead_jax.main", "--config", str(config),
                          "--workdir", str(tmp_path / "run")])
  assert _one_line(result).startswith(
      f"error: --config {config}, line {line}: the config file failed to load ({error})")
  assert not (tmp_path / "run").exists()


_WITHOUT_TORCH = ("import sys, runpy; sys.modules['torch'] = None; sys.argv[0] = 'crosscheck'; "
                  "runpy.run_module('clead_jax.crosscheck', run_name='__main__')")


@pytest.mark.slow
def test_crosscheck_without_pytorch_says_so_in_one_line(finished, tmp_path):
  workdir = _with_autoattack(_copy(finished, tmp_path))
  before = processes.digest(workdir)
  result = processes.run([sys.executable, "-c", _WITHOUT_TORCH, "--workdir", workdir])
  assert _one_line(result).startswith("error: PyTorch is not installed; pip install -e '.[torch]'")
  assert processes.digest(workdir) == before


# --- 5. another threat model ------------------------------------------------------------------------

@pytest.mark.slow
def test_evaluate_at_another_epsilon_writes_a_report_of_its_own(finished, tmp_path):
  workdir = _copy(finished, tmp_path)
  main_report = {k: v for k, v in processes.digest(workdir).items()
                 if not k.startswith("linf_eps")}
  result = processes.run(EVALUATE + ["--workdir", workdir, "--epsilon", "0.1",
                                     "--attacks=fgsm,pgd20"])
  assert result.returncode == 0, result.stderr[-3000:]
  other = processes.read_report(os.path.join(workdir, "linf_eps0.1"))
  assert other["epsilon"] == 0.1 and other["norm"] == "linf"
  assert set(other["robust_accuracy"]) == {"fgsm", "pgd20"}
  trained = processes.read_report(workdir)
  assert trained["epsilon"] == 0.2
  # A smaller ball: never less robust than at the training epsilon.
  assert other["robust_accuracy"]["pgd20"] >= trained["robust_accuracy"]["pgd20"]
  assert {k: v for k, v in processes.digest(workdir).items()
          if not k.startswith("linf_eps")} == main_report


def test_evaluate_help_shows_only_what_evaluate_accepts():
  result = processes.run(EVALUATE + ["--help"])
  assert result.returncode == 0, result.stderr[-3000:]
  assert "--epsilon:" in result.stdout and "--norm:" in result.stdout
  assert "attack.epsilon = " not in result.stdout  # no config field it would refuse
  assert "--verbosity:" in result.stdout
