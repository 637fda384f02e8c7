"""Real signals at real moments (the first compile, the final evaluation, a study, AutoAttack) and a
real full disk, in real processes: one line, a documented exit code, every earlier checkpoint and
report entry intact, and the same command resumes. tests/soak_signals.py repeats the first two
many times."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests import processes
from tests.processes import cache, finished  # pylint: disable=unused-import  (fixtures)
from tests.conftest import REPO

pytestmark = pytest.mark.slow


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
          "--config.train.epochs=8", "--config.attack.steps=2", "--config.train.log_every=20",
          "--config.train.checkpoint_every=20", "--config.train.keep_checkpoints=10",
          "--config.eval.attacks=fgsm", "--config.eval.num_examples=100",
          "--config.eval.curve_points=0"]
  env = dict(processes.env(), DISK=str(tmp_path / "disk"), OUT=str(out), FULL_AFTER="40")
  done = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "bash", "-c",
                         _DISK_FULL, "disk_full", *argv], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  if done.returncode == 77 or (done.returncode != 0 and not (out / "rc").exists()):
    pytest.skip(f"no private tmpfs here (unshare/mount: {done.stderr.strip()[-200:]})")
  read = lambda name: (out / name).read_text()
  lines = processes.messages(read("stderr"))
  assert read("rc").strip() == "2" and len(lines) == 1, read("stderr")[-3000:]
  assert lines[0].startswith("error: saving checkpoint 60 into ") and (
      "no space left on device" in lines[0]) and (
      "resume from step 40 (earlier checkpoints [20, 40] are intact)" in lines[0]), lines[0]
  before = [l for l in read("before").splitlines() if l.split()[-1].startswith(("./20/", "./40/"))]
  assert before and read("after").splitlines() == before
  assert read("rc2").strip() == "0", read("stderr2")[-3000:]
  assert "resuming from step 40" in read("stdout2"), read("stdout2")[-3000:]


@pytest.mark.parametrize("signum,code,times", [(signal.SIGINT, 130, 2), (signal.SIGTERM, 143, 2)],
                         ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_the_first_compile_is_one_line_and_exit_128_plus_it(tmp_path, signum,
                                                                            code, times):
  """Ctrl-C or SIGTERM while XLA compiles the first step: deferred to the end of the compile, then
  one line and exit 130 or 143 (nothing had run); no checkpoint, no traceback, no crash."""
  workdir = tmp_path / "run"
  name = signal.Signals(signum).name
  for _ in range(times):
    # No compilation cache and XLA's usual optimisation: a cold compile long enough to be inside
    # of, which starts once config.json is written.
    process = processes.start(processes.main_command(workdir, processes.ALL_ATTACKS),
                              xla_flags="")
    processes.wait_for(lambda: (workdir / "config.json").exists(), process)
    # config.json is written right before the compile starts; the tiny model's cold compile takes
    # about 2 s on an idle 2-core machine (3 s, as before, landed in training there).
    time.sleep(0.5)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=300)
    lines = processes.messages(stderr)
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
  argv = processes.main_command(workdir, "--config.eval.attacks=pgd20,pgd100,cw",
                                "--config.eval.num_examples=-1", cache=cache)
  process = processes.start(argv)
  processes.wait_for(lambda: (workdir / "report.json").exists(), process)  # after the first attack
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=300)
  assert process.returncode == 0, stderr[-3000:]
  lines = [l for l in processes.messages(stderr) if "clead_jax: stopped" in l]
  assert len(lines) == 1 and "training is finished and checkpoint" in lines[0], stderr[-3000:]
  partial = processes.read_report(workdir)
  assert "pgd20" in partial["robust_accuracy"]
  result = processes.run(argv)
  assert result.returncode == 0, result.stderr[-3000:]
  report = processes.read_report(workdir)
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
          *[a for a in processes.TINY if not a.startswith("--config.method")],
          "--config.eval.attacks=fgsm", f"--config.compilation_cache_dir={cache}"]
  first = workdir / "pgd_at" / "seed0"
  second = workdir / "pgd_at" / "seed1"
  process = processes.start(argv)
  processes.wait_for(lambda: (second / "checkpoints").is_dir(), process)  # the second run began
  kept = processes.digest(first)
  process.send_signal(signal.SIGTERM)
  stdout, stderr = process.communicate(timeout=300)
  assert process.returncode == 0, stderr[-3000:]
  lines = [l for l in processes.messages(stderr) if "clead_jax: stopped" in l]
  assert len(lines) == 1 and "study run [2/2] pgd_at seed 1" in lines[0], stderr[-3000:]
  assert "run the same study command to resume" in lines[0]
  assert processes.digest(first) == kept and (workdir / "study.md").exists()
  result = processes.run(argv)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "[1/2] pgd_at seed 0: finished earlier" in result.stdout, result.stdout[-3000:]
  assert processes.digest(first) == kept
  assert json.loads((workdir / "study.json").read_text())["rows"][0]["seeds_finished"] == [0, 1]


def test_autoattack_stopped_mid_stage_resumes_to_the_same_report(finished, tmp_path):
  """SIGTERM while AutoAttack runs (after its first stage saved its progress): one line, exit 0,
  the state kept; the same command resumes and ends with the report of an uninterrupted run."""
  whole, stopped = str(tmp_path / "whole"), str(tmp_path / "stopped")
  shutil.copytree(finished, whole)
  shutil.copytree(finished, stopped)
  evaluate = lambda d: [sys.executable, "-m", "clead_jax.evaluate", "--workdir", d,
                        "--attacks=autoattack"]
  result = processes.run(evaluate(whole))
  assert result.returncode == 0, result.stderr[-3000:]
  state = os.path.join(stopped, "autoattack_state", "autoattack.npz")
  process = processes.start(evaluate(stopped))
  processes.wait_for(lambda: os.path.exists(state), process)
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=300)
  assert process.returncode == 0, stderr[-3000:]
  lines = [l for l in processes.messages(stderr) if "clead_jax: stopped" in l]
  assert len(lines) == 1 and "autoattack progress" in lines[0], stderr[-3000:]
  assert os.path.exists(state)
  result = processes.run(evaluate(stopped))
  assert result.returncode == 0, result.stderr[-3000:]
  assert "resuming autoattack" in result.stdout
  assert (processes.without_timings(processes.read_report(stopped))
          == processes.without_timings(processes.read_report(whole)))
  assert not os.path.exists(state)  # a finished evaluation discards its progress
