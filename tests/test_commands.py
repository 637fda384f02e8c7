"""The commands as a user runs them, in real processes: reports that accumulate, one line and exit
code 2 for every bad input with the workdir left byte-identical, and real signals in every phase
(compilation, the final evaluation, AutoAttack) ending in one line and a documented exit code."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

# A tiny digits PGD-AT run: something stays robust, so AutoAttack has several stages to run.
TINY = ["--config.method=pgd_at", "--config.model.width=8", "--config.model.projection_dim=16",
        "--config.train.epochs=2", "--config.attack.steps=2", "--config.train.log_every=5",
        "--config.train.checkpoint_every=5", "--config.eval.num_examples=100",
        "--config.eval.curve_points=0"]
ALL_ATTACKS = "--config.eval.attacks=fgsm,pgd20,pgd100,cw"


def _env():
  return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu", XLA_FLAGS="")


def _main(workdir, *extra, cache=None):
  return [sys.executable, "-m", "clead_jax.main", "--config", "configs/digits.py",
          "--workdir", str(workdir), *TINY,
          f"--config.compilation_cache_dir={cache or ''}", *extra]


def _run(argv, timeout=600):
  return subprocess.run(argv, cwd=REPO, env=_env(), capture_output=True, text=True,
                        timeout=timeout)


def _start(argv):
  return subprocess.Popen(argv, cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _digest(workdir):
  """Every file of the workdir but the command log, by its hash."""
  found = {}
  for root, _, files in os.walk(workdir):
    for name in files:
      if name == "clead_jax.log":
        continue
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        found[os.path.relpath(path, workdir)] = hashlib.sha256(f.read()).hexdigest()
  return found


def _report(workdir):
  with open(os.path.join(workdir, "report.json")) as f:
    return json.load(f)


def _without_timings(report):
  drop = ("train_time_s", "eval_time_s", "compile_time_s", "attack_time_s", "measured")
  return {k: v for k, v in report.items() if k not in drop}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("xla_cache"))


@pytest.fixture(scope="module")
def finished(tmp_path_factory, cache):
  """A finished tiny run with FGSM, PGD-20, PGD-100 and CW in its report."""
  workdir = tmp_path_factory.mktemp("finished")
  result = _run(_main(workdir, ALL_ATTACKS, cache=cache))
  assert result.returncode == 0, result.stderr[-3000:]
  return str(workdir)


def test_evaluate_after_training_adds_autoattack_and_keeps_every_attack(finished, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(finished, workdir)
  checkpoints = {k: v for k, v in _digest(workdir).items() if k.startswith("checkpoints")}
  before = _report(workdir)
  result = _run([sys.executable, "-m", "clead_jax.evaluate", "--workdir", workdir,
                 "--attacks=autoattack"])
  assert result.returncode == 0, result.stderr[-3000:]
  after = _report(workdir)
  for name in ("fgsm", "pgd20", "pgd100", "cw"):
    assert after["robust_accuracy"][name] == before["robust_accuracy"][name]
    assert after["measured"][name] == before["measured"][name]
  assert "autoattack" in after["robust_accuracy"]
  assert "clead_jax.evaluate" in after["measured"]["autoattack"]["command"]
  assert "clead_jax.main" in after["measured"]["pgd20"]["command"]
  # The worst case is over all five attacks, per example, from the stored flags.
  flags = np.load(os.path.join(workdir, "report_examples.npz"))
  every = flags["clean"].copy()
  for name in ("fgsm", "pgd20", "pgd100", "cw", "autoattack"):
    every &= flags[name]
  assert after["worst_case_accuracy"] == pytest.approx(every.mean())
  assert after["worst_case_accuracy"] <= min(after["robust_accuracy"].values())
  assert {k: v for k, v in _digest(workdir).items() if k.startswith("checkpoints")} == checkpoints


BAD_INPUTS = [
    # (what, command after the program, start of the one line)
    ("unknown config section", ["--config", "configs/digits.py", "--config.attak.epsilon=0.1"],
     "error: --config.attak.epsilon: the config has no field 'attak' (did you mean "
     "config.attack.epsilon"),
    ("unknown config field", ["--config", "configs/digits.py", "--config.attack.epsilonn=0.1"],
     "error: --config.attack.epsilonn: the config has no field 'epsilonn' (did you mean "
     "config.attack.epsilon"),
    ("missing config file", ["--config", "configs/nope.py"], "error: --config configs/nope.py:"),
    ("override without --config", ["--config.train.epochs=3"],
     "error: --config.train.epochs=3 overrides a config field, but no --config FILE was given"
     .replace("=3", "")),
    ("value of the wrong type", ["--config", "configs/digits.py", "--config.train.epochs=three"],
     "error: "),
    ("out-of-range value", ["--config", "configs/digits.py", "--config.attack.epsilon=-0.1"],
     "error: config.attack.epsilon=-0.1"),
    ("zero test examples", ["--config", "configs/digits.py", "--config.eval.num_examples=0"],
     "error: config.eval.num_examples=0 must be -1 (the whole test split)"),
]


@pytest.mark.parametrize("what,args,line", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_training_input_is_one_line_and_the_workdir_is_untouched(finished, tmp_path, what,
                                                                     args, line):
  workdir = str(tmp_path / "run")
  shutil.copytree(finished, workdir)
  before = _digest(workdir)
  result = _run([sys.executable, "-m", "clead_jax.main", "--workdir", workdir, *args])
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2 and len(lines) == 1, (what, result.stderr[-3000:])
  assert lines[0].startswith(line), (what, lines[0])
  assert _digest(workdir) == before


def test_missing_workdir_is_one_line():
  result = _run([sys.executable, "-m", "clead_jax.main", "--config", "configs/digits.py"])
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      "error: --workdir is required: Directory for checkpoints, metrics and reports."]


@pytest.mark.parametrize("count", ["0", "-5"])
def test_evaluate_refuses_zero_and_negative_example_counts(finished, tmp_path, count):
  workdir = str(tmp_path / "run")
  shutil.copytree(finished, workdir)
  before = _digest(workdir)
  result = _run([sys.executable, "-m", "clead_jax.evaluate", "--workdir", workdir,
                 "--attacks=fgsm", f"--num_examples={count}"])
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
  assert lines[0].startswith(f"error: --num_examples={count} must be -1 (the whole test split)")
  assert _digest(workdir) == before


def test_a_changed_model_names_the_config_field(finished, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(finished, workdir)
  before = _digest(workdir)
  result = _run(_main(workdir, ALL_ATTACKS, "--config.model.width=12"))
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
  assert "config.model.width: checkpoint 8, now 12" in lines[0]
  assert _digest(workdir) == before


def _messages(stderr):
  """stderr without the progress bars training and evaluation draw there."""
  return [l for l in stderr.replace("\r", "\n").splitlines()
          if l.strip() and "it/s" not in l and "s/it" not in l]


def test_a_non_finite_loss_before_the_first_checkpoint_says_so(tmp_path, cache):
  result = _run(_main(tmp_path / "run", "--config.train.learning_rate=1e30", cache=cache))
  lines = _messages(result.stderr)
  assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
  assert "non-finite" in lines[0] and "no checkpoint was saved yet" in lines[0], lines[0]
  assert "None" not in lines[0] and "Traceback" not in result.stderr


# PyTorch made unimportable in a real process, as on a machine without the [torch] extra.
_WITHOUT_TORCH = "import sys, runpy; sys.modules['torch'] = None; sys.argv[0] = '{0}'; " \
                 "runpy.run_module('{0}', run_name='__main__')"


@pytest.mark.parametrize("module,args,line", [
    ("clead_jax.bench", ["train_step", "--model", "small_cnn", "--compare", "torch"],
     "error: --compare torch needs PyTorch, an optional extra: pip install -e '.[torch]'"),
    ("clead_jax.export", ["--workdir", "WORKDIR", "--out", "OUT.pt"],
     "error: PyTorch is not installed; pip install -e '.[torch]'"),
], ids=["bench", "export"])
def test_commands_needing_pytorch_say_so_in_one_line(finished, tmp_path, module, args, line):
  args = [a.replace("WORKDIR", finished).replace("OUT", str(tmp_path / "model")) for a in args]
  before = _digest(finished)
  result = _run([sys.executable, "-c", _WITHOUT_TORCH.format(module), *args])
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith(line), (
      result.stderr[-3000:])
  assert _digest(finished) == before and not os.listdir(tmp_path)


def test_main_help_lists_every_config_field_and_every_registered_name():
  from clead_jax import config_tools  # pylint: disable=g-import-not-at-top
  from clead_jax import default_config  # pylint: disable=g-import-not-at-top
  from clead_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  from clead_jax import methods  # pylint: disable=g-import-not-at-top
  from clead_jax import models  # pylint: disable=g-import-not-at-top
  from clead_jax.evaluation import suite  # pylint: disable=g-import-not-at-top
  result = _run([sys.executable, "-m", "clead_jax.main", "--help"])
  assert result.returncode == 0, result.stderr[-3000:]
  text = result.stdout
  fields = config_tools.flatten(default_config.get_base_config().to_dict())
  missing = [f for f, v in fields.items() if f"  {f} = {v!r}" not in text]
  assert not missing, missing
  # The meaning of a field, from the comment beside it in default_config.py.
  assert "attack.norm = 'linf'  # linf or l2" in text
  flat = " ".join(text.split())
  for title, names in (("methods", methods.METHODS), ("datasets", input_pipeline.DATASETS),
                       ("models", models.MODELS), ("attacks", suite.ATTACK_NAMES)):
    listed = flat.split(f"{title} (", 1)[1].split(": ", 1)[1]
    assert all(name in listed for name in names), (title, listed[:300])


def test_bench_errors_are_one_line():
  result = _run([sys.executable, "-m", "clead_jax.bench", "train_step", "--model", "nonsense"])
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (
      result.stderr[-3000:])


# A real full disk: a 64 MB tmpfs in a private mount namespace (unprivileged through a user
# namespace), filled with dd while training runs, right after a checkpoint was written.
_DISK_FULL = r"""
set -u
mkdir -p "$DISK" && mount -t tmpfs -o size=64m tmpfs "$DISK" || exit 77
"$@" --workdir "$DISK/run" > "$OUT/stdout" 2> "$OUT/stderr" &
pid=$!
while [ ! -d "$DISK/run/checkpoints/$FULL_AFTER" ] && kill -0 $pid 2>/dev/null; do sleep 0.02; done
(cd "$DISK/run/checkpoints" && find . -type f | sort | xargs sha256sum) > "$OUT/before"
dd if=/dev/zero of="$DISK/fill" bs=1M 2>/dev/null
wait $pid; echo $? > "$OUT/rc"
(cd "$DISK/run/checkpoints" && find . -type f -path "./[0-9]*" ! -path "*tmp*" | sort \
  | xargs sha256sum) > "$OUT/after"
rm "$DISK/fill"
"$@" --workdir "$DISK/run" > "$OUT/stdout2" 2> "$OUT/stderr2"; echo $? > "$OUT/rc2"
"""


def test_a_full_disk_is_one_line_naming_the_failed_checkpoint_and_resumes(tmp_path):
  """The disk fills up after checkpoint 40: one line naming the checkpoint whose write failed
  and the step to resume from, exit 2, checkpoints 20 and 40 byte-identical; with space freed the
  same command resumes from 40 and finishes."""
  if not shutil.which("unshare"):
    pytest.skip("needs util-linux's unshare for a private tmpfs")
  out = tmp_path / "out"
  out.mkdir()
  argv = [sys.executable, "-m", "clead_jax.main", "--config", "configs/digits.py",
          "--config.method=pgd_at", "--config.model.width=8", "--config.model.projection_dim=16",
          "--config.train.epochs=30", "--config.attack.steps=2", "--config.train.log_every=20",
          "--config.train.checkpoint_every=20", "--config.train.keep_checkpoints=10",
          "--config.eval.attacks=fgsm", "--config.eval.num_examples=100",
          "--config.eval.curve_points=0"]
  env = dict(_env(), DISK=str(tmp_path / "disk"), OUT=str(out), FULL_AFTER="40")
  done = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "bash", "-c",
                         _DISK_FULL, "disk_full", *argv], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  if done.returncode == 77 or (done.returncode != 0 and not (out / "rc").exists()):
    pytest.skip(f"no private tmpfs here (unshare/mount: {done.stderr.strip()[-200:]})")
  read = lambda name: (out / name).read_text()
  lines = _messages(read("stderr"))
  assert read("rc").strip() == "2" and len(lines) == 1, read("stderr")[-3000:]
  assert lines[0].startswith("error: saving checkpoint 60 into ") and (
      "no space left on device" in lines[0]) and (
      "resume from step 40 (earlier checkpoints [20, 40] are intact)" in lines[0]), lines[0]
  before = [l for l in read("before").splitlines() if l.split()[-1].startswith(("./20/", "./40/"))]
  assert before and read("after").splitlines() == before
  assert read("rc2").strip() == "0", read("stderr2")[-3000:]
  assert "resuming from step 40" in read("stdout2"), read("stdout2")[-3000:]


def _wait_for(predicate, process, timeout=300):
  deadline = time.time() + timeout
  while not predicate():
    assert process.poll() is None, process.communicate()[1][-3000:]
    assert time.time() < deadline, "timed out"
    time.sleep(0.05)


@pytest.mark.parametrize("signum,code,times", [(signal.SIGINT, 130, 3), (signal.SIGTERM, 143, 2)],
                         ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_the_first_compile_is_one_line_and_exit_128_plus_it(tmp_path, signum,
                                                                            code, times):
  """Ctrl-C or SIGTERM while XLA compiles the first step: deferred to the end of the compile, then
  one line and exit 130 or 143 (nothing had run); no checkpoint, no traceback, no crash."""
  workdir = tmp_path / "run"
  name = signal.Signals(signum).name
  for _ in range(times):
    process = _start(_main(workdir, ALL_ATTACKS))  # no compilation cache: a cold compile
    _wait_for(lambda: (workdir / "config.json").exists(), process)  # compilation starts now
    time.sleep(3.0)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=300)
    lines = _messages(stderr)
    assert process.returncode == code, stderr[-3000:]
    assert lines == [lines[-1]] and lines[-1].startswith(
        f"clead_jax: stopped by {name}; before the first training step"), stderr[-3000:]
    assert not (workdir / "checkpoints").exists() or not any(
        d.isdigit() for d in os.listdir(workdir / "checkpoints"))


def test_sigterm_during_the_final_evaluation_keeps_training_and_resumes(tmp_path, cache):
  """SIGTERM once training is done and the final evaluation runs: one line, exit 0, the last
  checkpoint and the attacks finished so far are kept; the same command finishes the report
  without training again (and keeps the training time)."""
  workdir = tmp_path / "run"
  argv = _main(workdir, "--config.eval.attacks=pgd20,pgd100,cw", "--config.eval.num_examples=-1",
               cache=cache)
  process = _start(argv)
  _wait_for(lambda: (workdir / "report.json").exists(), process)  # after the first attack
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=300)
  assert process.returncode == 0, stderr[-3000:]
  lines = [l for l in _messages(stderr) if "clead_jax: stopped" in l]
  assert len(lines) == 1 and "training is finished and checkpoint" in lines[0], stderr[-3000:]
  partial = _report(workdir)
  assert "pgd20" in partial["robust_accuracy"]
  result = _run(argv)
  assert result.returncode == 0, result.stderr[-3000:]
  report = _report(workdir)
  assert set(report["robust_accuracy"]) == {"pgd20", "pgd100", "cw"}
  assert report["robust_accuracy"]["pgd20"] == partial["robust_accuracy"]["pgd20"]
  assert report["train_time_s"] == partial["train_time_s"] > 0
  assert "resuming from step" in result.stdout


def test_sigterm_during_a_study_keeps_the_finished_runs_and_resumes(tmp_path, cache):
  """SIGTERM while a study trains its second run: one line, exit 0, the first run's files
  byte-identical and in the summary; the same command skips it and finishes the study."""
  workdir = tmp_path / "study"
  argv = [sys.executable, "-m", "clead_jax.study", "--config", "configs/digits.py",
          "--methods", "pgd_at", "--seeds", "2", "--workdir", str(workdir),
          *[a for a in TINY if not a.startswith("--config.method")],
          "--config.eval.attacks=fgsm", f"--config.compilation_cache_dir={cache}"]
  first = workdir / "pgd_at" / "seed0"
  second = workdir / "pgd_at" / "seed1"
  process = _start(argv)
  _wait_for(lambda: (second / "checkpoints").is_dir(), process)  # the second run is training
  kept = _digest(first)
  process.send_signal(signal.SIGTERM)
  stdout, stderr = process.communicate(timeout=300)
  assert process.returncode == 0, stderr[-3000:]
  lines = [l for l in _messages(stderr) if "clead_jax: stopped" in l]
  assert len(lines) == 1 and "study run [2/2] pgd_at seed 1" in lines[0], stderr[-3000:]
  assert "run the same study command to resume" in lines[0]
  assert _digest(first) == kept and (workdir / "study.md").exists()
  result = _run(argv)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "[1/2] pgd_at seed 0: finished earlier" in result.stdout, result.stdout[-3000:]
  assert _digest(first) == kept
  assert json.loads((workdir / "study.json").read_text())["rows"][0]["seeds_finished"] == [0, 1]


def test_autoattack_stopped_mid_stage_resumes_to_the_same_report(finished, tmp_path):
  """SIGTERM while AutoAttack runs (after its first stage saved its progress): one line, exit 0,
  the state kept; the same command resumes and ends with the report of an uninterrupted run."""
  whole, stopped = str(tmp_path / "whole"), str(tmp_path / "stopped")
  shutil.copytree(finished, whole)
  shutil.copytree(finished, stopped)
  evaluate = lambda d: [sys.executable, "-m", "clead_jax.evaluate", "--workdir", d,
                        "--attacks=autoattack"]
  result = _run(evaluate(whole))
  assert result.returncode == 0, result.stderr[-3000:]
  state = os.path.join(stopped, "autoattack_state", "autoattack.npz")
  process = _start(evaluate(stopped))
  _wait_for(lambda: os.path.exists(state), process)
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=300)
  assert process.returncode == 0, stderr[-3000:]
  lines = [l for l in _messages(stderr) if "clead_jax: stopped" in l]
  assert len(lines) == 1 and "autoattack progress" in lines[0], stderr[-3000:]
  assert os.path.exists(state)
  result = _run(evaluate(stopped))
  assert result.returncode == 0, result.stderr[-3000:]
  assert "resuming autoattack" in result.stdout
  assert _without_timings(_report(stopped)) == _without_timings(_report(whole))
  assert not os.path.exists(state)  # a finished evaluation discards its progress
