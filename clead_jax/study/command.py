"""The study command (console script: clead-study).

  python -m clead_jax.study --config configs/digits.py --methods standard,pgd_at,trades,clead \
      --seeds 3 --workdir runs/digits_study
  python -m clead_jax.study --config configs/digits.py --methods clead --baselines pgd_at \
      --seeds 3 --sweep config.loss.lam=0,0.1,0.5,1,2 --workdir runs/digits_study

Trains and evaluates every method x seed (x sweep setting) not yet finished, then writes
DIR/study.md, study.json and two plots; see clead_jax/study/runs.py for the layout of DIR. The
default attacks are FGSM, PGD-20, PGD-100, CW and AutoAttack, plus the paper's transfer attack
(surrogate: the study's own standard run) when the study trains one.

The same study spread over machines (launch/study_slurm.sh, launch/gke_study.sh): add to the same
command line
  --plan          write DIR/plan.json and print one line per run: index, label, seed, workdir;
  --run_index=K   train and evaluate run K only (resuming it); a run whose transfer surrogate has
                  not finished waits --surrogate_wait_s seconds for it, then says so;
  --collect       write the summary of the runs that have finished, naming the others.
Each writes only its own run's directory (and plan.json when it is missing), so any number of
--run_index processes may run at once.
"""

import os
import shlex
import sys

from absl import flags
from ml_collections import config_flags

from clead_jax import command_line


def _define_flags():
  config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory of the study: one sub-directory per run.")
  flags.DEFINE_string("methods", "standard,pgd_at,trades,clead",
                      "Comma-separated methods (clead_jax/methods.py METHODS).")
  flags.DEFINE_integer("seeds", 3, "Seeds per method: config.seed, config.seed + 1, ...")
  flags.DEFINE_multi_string("sweep", [], "config.field=v1,v2,... (repeat for a grid).")
  flags.DEFINE_string("baselines", "",
                      "Comma-separated methods run without the sweep, as reference rows.")
  flags.DEFINE_bool("plan", False, "Write DIR/plan.json and print the runs; train nothing.")
  flags.DEFINE_integer("run_index", None, "Train and evaluate only this run of the plan.")
  flags.DEFINE_bool("collect", False,
                    "Write the summary of the finished runs, naming the others; train nothing.")
  flags.DEFINE_float("surrogate_wait_s", 0.0,
                     "With --run_index: seconds to wait for the run's transfer surrogate.")


def main(argv):
  command_line.start(argv)
  command_line.require("config", "workdir")
  values = flags.FLAGS
  command_line.log_to(values.workdir)
  with command_line.user_errors_as_one_line():
    # pylint: disable=g-import-not-at-top  (after the flags and the signal handlers)
    import jax
    from clead_jax import distributed
    from clead_jax.errors import UserError
    from clead_jax.study import runs
    from clead_jax.study import tables
    from clead_jax import workdir_lock
    distributed.initialize(None, None, None)
    workdir_lock.check_writable(values.workdir, "--workdir")
    config = values.config
    if values.seeds < 1:
      raise UserError(f"--seeds={values.seeds} must be >= 1")
    methods = runs.parse_methods(values.methods)
    baselines = runs.parse_methods(values.baselines, "--baselines") if values.baselines else []
    sweeps = [runs.parse_sweep(spec, config) for spec in values.sweep]
    if len({f for f, _ in sweeps}) != len(sweeps):
      raise UserError("--sweep names a field twice")
    if not ("config.eval.attacks" in values and values["config.eval.attacks"].present):
      config.eval.attacks = runs.default_eval_attacks(methods, baselines)
    modes = [m for m in ("plan", "run_index", "collect") if values[m].value not in (None, False)]
    if len(modes) > 1:
      raise UserError(f"--{' and --'.join(modes)}: give at most one of --plan, --run_index, "
                      "--collect")
    is_writer = jax.process_index() == 0
    study = (config, values.workdir, methods, values.seeds, sweeps, baselines)
    if values.plan:
      runs.print_plan(*study, is_writer=is_writer)
      return
    if values.run_index is not None:  # many at once: each run locks its own directory
      runs.run_index(*study[:4], values.run_index, sweeps, baselines, is_writer=is_writer,
                     surrogate_wait_s=values.surrogate_wait_s)
      return
    if is_writer:
      # One writer per summary (DIR/study_<sweep fields>.lock), and each run locks its own
      # directory: studies of other sweeps (ablations) can run in DIR at once, sharing its runs.
      os.makedirs(values.workdir, exist_ok=True)
      summary_lock = os.path.basename(tables.stem_path(values.workdir, sweeps)) + ".lock"
      workdir_lock.acquire(values.workdir, lock_file=summary_lock)
    command = shlex.join(["python", "-m", "clead_jax.study"] + _study_args(sys.argv[1:]))
    if values.collect:
      summary = runs.collect(*study, None, command, is_writer=is_writer)
    else:
      summary = runs.run_study(*study, None, command, is_writer=is_writer)
  if jax.process_index() == 0:  # the study's table, as study.md holds it
    with open(os.path.join(values.workdir, tables.stem(summary) + ".md")) as f:
      print(f.read(), flush=True)
  failed = sum(len(row["seeds_failed"]) for row in summary["rows"])
  if failed:
    print(f"error: {failed} run(s) failed; see {tables.stem(summary)}.md; the others are "
          "summarised", file=sys.stderr)
    sys.exit(1)


def _study_args(argv):
  """The command line without the flags that choose a mode (--collect): the study's command."""
  return [a for a in argv if a.split("=", 1)[0] not in ("--collect", "--nocollect")]


def run():
  command_line.run(main, _define_flags, __doc__)


if __name__ == "__main__":
  run()
