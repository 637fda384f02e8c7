"""Signals at real moments, many times in a row: the soak behind tests/test_signals.py's
tests (which do it a few times). Not collected by pytest; run it by hand:

  python -m tests.soak_signals --runs 20 [--phase compile|evaluation|both]

compile:    SIGINT while XLA compiles the first training step (cold, no compilation cache), at
            0.5 to 4 s after the run wrote config.json (compilation starts then); expected: one
            line and exit 130 (nothing had run), or, where the compile had already finished,
            one line and exit 0 with a checkpoint.
evaluation: SIGTERM during the final evaluation (after its first attack wrote report.json);
            expected: one line and exit 0, then the same command finishes the report without
            training again and keeps the training time.
Any other exit code, a second line, a traceback or a crash counts as a failure. Prints one line
per run and the counts; exit code 1 if any run failed.
"""

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time

from tests import processes

_COMPILE_DELAYS_S = (0.5, 1.0, 2.0, 3.0, 4.0)
_BAD = ("Traceback", "Fatal Python error", "Segmentation fault")


def _compile_once(workdir, delay):
  """(ok, what happened) of one SIGINT during the first compile."""
  process = processes.start(processes.main_command(workdir, processes.ALL_ATTACKS))
  processes.wait_for(lambda: os.path.exists(os.path.join(workdir, "config.json")), process)
  time.sleep(delay)
  process.send_signal(signal.SIGINT)
  _, stderr = process.communicate(timeout=300)
  lines = processes.messages(stderr)
  stops = [l for l in lines if l.startswith("clead_jax: stopped by SIGINT")]
  clean = len(stops) == 1 and lines[-1] == stops[0] and not any(b in stderr for b in _BAD)
  if process.returncode == 130:
    ok = clean and len(lines) == 1 and "before the first training step" in stops[0]
  else:
    ok = clean and process.returncode == 0 and "checkpoint saved at step" in stops[0]
  return ok, f"exit {process.returncode}: {stops[0] if stops else lines[-3:]}"


def _evaluation_once(workdir, cache):
  """(ok, what happened) of one SIGTERM during the final evaluation, then the resume."""
  argv = processes.main_command(workdir, "--config.eval.attacks=pgd20,pgd100,cw",
                        "--config.eval.num_examples=-1", cache=cache)
  process = processes.start(argv)
  processes.wait_for(lambda: os.path.exists(os.path.join(workdir, "report.json")), process)
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=300)
  stops = [l for l in processes.messages(stderr) if "clead_jax: stopped" in l]
  ok = (process.returncode == 0 and len(stops) == 1 and "training is finished" in stops[0]
        and not any(b in stderr for b in _BAD))
  partial = processes.read_report(workdir)
  result = processes.run(argv)
  report = processes.read_report(workdir) if result.returncode == 0 else {}
  ok = ok and (result.returncode == 0 and "resuming from step" in result.stdout
               and set(report.get("robust_accuracy", {})) == {"pgd20", "pgd100", "cw"}
               and report["train_time_s"] == partial["train_time_s"] > 0)
  return ok, (f"exit {process.returncode}: {stops[0] if stops else stderr[-300:]}; rerun exit "
              f"{result.returncode}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", type=int, default=20)
  parser.add_argument("--phase", choices=("compile", "evaluation", "both"), default="both")
  args = parser.parse_args()
  phases = ("compile", "evaluation") if args.phase == "both" else (args.phase,)
  failed = 0
  root = tempfile.mkdtemp(prefix="soak_signals_")
  try:
    cache = os.path.join(root, "xla_cache")
    for phase in phases:
      good = 0
      for run in range(args.runs):
        workdir = os.path.join(root, f"{phase}{run}")
        start = time.time()
        if phase == "compile":
          ok, what = _compile_once(workdir, _COMPILE_DELAYS_S[run % len(_COMPILE_DELAYS_S)])
        else:
          ok, what = _evaluation_once(workdir, cache)
        good += ok
        print(f"{phase} {run + 1}/{args.runs}: {'ok' if ok else 'FAILED'} "
              f"({time.time() - start:.0f} s) {what}", flush=True)
      failed += args.runs - good
      print(f"{phase}: {good} of {args.runs} runs ended as documented", flush=True)
  finally:
    shutil.rmtree(root, ignore_errors=True)
  sys.exit(1 if failed else 0)


if __name__ == "__main__":
  main()
