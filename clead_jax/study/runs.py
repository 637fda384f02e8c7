"""The study: every method x seed (x sweep setting) trained and evaluated by
train.train_and_evaluate, then one table, one JSON file and two plots over all of the runs.

  python -m clead_jax.study --config configs/digits.py --methods standard,pgd_at,trades,clead \
      --seeds 3 --workdir runs/digits_study

Ablations sweep config fields (repeat --sweep for a grid); --baselines adds methods run without
the sweep, as reference rows:

  python -m clead_jax.study --config configs/digits.py --methods clead --baselines pgd_at \
      --seeds 3 --sweep config.loss.lam=0,0.1,0.5,1,2 --workdir runs/digits_study

Layout of DIR:
  <method>/seed<s>/                one run (train.train_and_evaluate's workdir);
  <method>/<field=value,...>/seed<s>/  a run with swept values other than the config's own; a
                                   swept value equal to the config's is the plain run, so
                                   ablations that share DIR with the main study reuse its runs;
  study.md, study.json, study_robust_vs_clean.png, study_curves.png: the summary; with --sweep
                                   named after the swept fields (study_loss.lam.md, ...).
A run whose report.json holds every attack and the final checks ("warnings": an evaluation
stopped before them is resumed) is not repeated (its config.json must match, else an error names
the differing fields) if that report is the run's final evaluation: of its last checkpoint (the
weights' fingerprint checked against it), its training config and the study's examples and threat
model. Another report (after `evaluate --checkpoint=best` or `--num_examples=100`, or of weights
since replaced) is named stale in one line and the final checkpoint is evaluated again (the stale
report is archived, never merged). An unfinished run resumes from its checkpoints. The worst case
of every run is over the white-box attacks that every run of the table shares; the Δ columns
compare only rows of the same threat model (norm, ε) and evaluation points. The table and the JSON
file are rewritten after every run, the plots at the end. Only process 0 prints and writes.
"""

import dataclasses
import itertools
import json
import os
import time
from typing import Any, Optional

from clead_jax import config_checks
from clead_jax import config_tools
from clead_jax import methods as methods_lib
from clead_jax import provenance
from clead_jax import report as report_lib
from clead_jax import stopping
from clead_jax import train
from clead_jax.errors import UserError
from clead_jax.evaluation import suite
from clead_jax.study import tables

# The evaluation suite of a study, and the paper's transfer attack for every run but the
# standard one, whose model is the surrogate (when the study trains one).
SUITE = ("fgsm", "pgd20", "pgd100", "cw", "autoattack")
TRANSFER = "transfer_pgd3"
SURROGATE_METHOD = "standard"
_NO_SWEEP_FIELDS = ("method", "seed")  # set by --methods and --seeds
# Fields a finished run may differ in and still count as done: they change neither the training
# nor a number of the report (eval.indicators adds or leaves out a diagnostic block).
_REPORT_NEUTRAL_FIELDS = ("train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
                          "data.data_dir", "data.download", "compilation_cache_dir",
                          "eval.batch_size", "eval.indicators")


def default_eval_attacks(methods, baselines=()):
  """config.eval.attacks of a study: the suite, and the transfer attack when the study trains
  its own standard run to be the surrogate."""
  names = list(SUITE)
  if SURROGATE_METHOD in list(methods) + list(baselines):
    names.append(TRANSFER)
  return ",".join(names)


# --- parsing --------------------------------------------------------------------------------------

def parse_methods(text, flag="--methods"):
  methods = [m.strip() for m in text.split(",") if m.strip()]
  unknown = [m for m in methods if m not in methods_lib.METHODS]
  if unknown:
    raise UserError(f"{flag}: unknown method(s) {unknown}; choose from "
                    f"{sorted(methods_lib.METHODS)}")
  if len(set(methods)) != len(methods):
    raise UserError(f"{flag}={text!r} names a method twice")
  return methods


def _parse_value(text, like, field):
  """`text` as the type of the field's current value `like`."""
  try:
    return config_tools.parse_value(text, like)
  except ValueError:
    raise UserError(f"--sweep config.{field}: {text!r} is not a {type(like).__name__}") from None
  except TypeError:
    raise UserError(f"--sweep config.{field}: fields of type {type(like).__name__} cannot be "
                    "swept") from None


def parse_sweep(spec, config):
  """'config.a.b=v1,v2' -> ('a.b', [v1, v2]) with values of the field's type."""
  field, sep, values = spec.partition("=")
  field = field.strip().removeprefix("config.")
  if not sep or not field or not values.strip():
    raise UserError(f"--sweep {spec!r}: expected config.field=v1,v2,...")
  if field in _NO_SWEEP_FIELDS:
    raise UserError(f"--sweep {spec!r}: set config.{field} with --{field}s, not --sweep")
  try:
    like = config_tools.get_field(config, field)
  except KeyError:
    raise UserError(f"--sweep {spec!r}: config.{field} is not a config field") from None
  parsed = [_parse_value(v.strip(), like, field) for v in values.split(",") if v.strip()]
  if len(set(parsed)) != len(parsed):
    raise UserError(f"--sweep {spec!r} repeats a value")
  return field, parsed


# --- the runs -------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Variant:
  """A method with a setting of the swept fields; `overrides` are those that differ from the
  config, and alone decide the directory."""
  method: str
  settings: tuple = ()  # ((field, value), ...), every swept field
  overrides: tuple = ()  # the subset whose value differs from the config's

  @property
  def label(self):
    return " ".join([self.method] + [f"{f}={v}" for f, v in self.settings])

  @property
  def path(self):
    parts = [self.method]
    if self.overrides:
      parts.append(",".join(f"{f}={v}" for f, v in self.overrides))
    return os.path.join(*parts)


def make_variants(config, methods, sweeps, baselines=()):
  """Baselines without the sweep, then methods x the grid of swept values."""
  variants = [Variant(m) for m in baselines]
  fields = [field for field, _ in sweeps]
  for method in methods:
    for values in itertools.product(*[vals for _, vals in sweeps]):
      settings = tuple(zip(fields, values))
      overrides = tuple((f, v) for f, v in settings if v != config_tools.get_field(config, f))
      variants.append(Variant(method, settings, overrides))
  return list(dict.fromkeys(variants))  # a baseline also in --methods, once


def run_dir(workdir, variant, seed):
  return os.path.join(workdir, variant.path, f"seed{seed}")


def run_config(config, variant, seed, workdir):
  """The config of one run. With the transfer attack in the suite, the surrogate is the study's
  standard run of the same seed; the standard run itself does not attack itself."""
  config = config.copy_and_resolve_references()
  config.method = variant.method
  config.seed = seed
  for field, value in variant.overrides:
    config_tools.set_field(config, field, value)
  names = [n.strip() for n in config.eval.attacks.split(",") if n.strip()]
  if TRANSFER in names and not config.eval.surrogate:
    if variant.method == SURROGATE_METHOD and not variant.overrides:
      config.eval.attacks = ",".join(n for n in names if n != TRANSFER)
    else:
      config.eval.surrogate = run_dir(workdir, Variant(SURROGATE_METHOD), seed)
  return config


def finished_report(directory, config):
  """The run's report if it finished with this config (every attack of config.eval.attacks is
  in it); None if it has not finished. A report that is not of the run's final checkpoint, its
  config and the study's examples is checked by `stale_because`."""
  report_path = os.path.join(directory, "report.json")
  if not os.path.exists(report_path):
    return None
  with open(os.path.join(directory, "config.json")) as f:
    on_disk = config_tools.flatten(json.load(f))
  wanted = config_tools.flatten(json.loads(config.to_json_best_effort(sort_keys=True)))
  differing = sorted(k for k in on_disk.keys() | wanted.keys()
                     if on_disk.get(k) != wanted.get(k) and k not in _REPORT_NEUTRAL_FIELDS)
  if differing:
    raise UserError(f"{directory} holds a finished run with another config (config."
                    + ", config.".join(differing[:5]) + (", ..." if len(differing) > 5 else "")
                    + "); use another --workdir or remove that run")
  with open(report_path) as f:
    report = json.load(f)
  wanted_attacks = suite.parse_attack_names(config.eval.attacks)
  if (any(name not in report["robust_accuracy"] for name in wanted_attacks)
      or "warnings" not in report):  # stopped before its last attack, or before its checks
    return None  # the run resumes its final evaluation
  return report


def stale_because(report, config, final_weights):
  """Why `report` is not the run's final evaluation (of its last checkpoint, with its training
  config, on the study's examples and threat model), in words; None if it is.
  final_weights() -> (fingerprint, step) of the run's latest checkpoint, called only when every
  cheaper check passed."""
  evaluation = report.get("evaluation", {})
  if "weights_fingerprint" not in evaluation:
    return "it predates weight fingerprints"
  source = evaluation.get("checkpoint_source")
  if source != "checkpoints":
    return f"it is of {source}, not of the last checkpoint"
  if evaluation.get("checkpoint_step") != report.get("total_steps"):
    return (f"it is of step {evaluation.get('checkpoint_step')}, not of the final step "
            f"{report.get('total_steps')}")
  split = report.get("test_split_size", evaluation.get("num_examples"))
  requested = config.eval.num_examples
  examples = split if requested == -1 else min(requested, split)
  if evaluation.get("num_examples") != examples:
    return (f"it is of {evaluation.get('num_examples')} test examples, the study's "
            f"config.eval.num_examples={requested} means {examples}")
  if (evaluation.get("epsilon") != float(config.attack.epsilon)
      or evaluation.get("norm") != config.attack.norm):
    return (f"it is of {evaluation.get('norm')} epsilon {evaluation.get('epsilon')}, not "
            f"{config.attack.norm} {float(config.attack.epsilon)}")
  if evaluation.get("config_fingerprint") != provenance.config_fingerprint(config):
    return "it is of another training config (its fingerprint differs)"
  fingerprint, step = final_weights()
  if fingerprint != evaluation["weights_fingerprint"]:
    return (f"it is of weights {evaluation['weights_fingerprint']}, the checkpoint of step {step} "
            f"holds {fingerprint}")
  return None


def _final_weights_reader():
  """final_weights(directory, config) -> (fingerprint, step), loading each dataset once."""
  # pylint: disable=g-import-not-at-top
  from clead_jax import input_pipeline
  from clead_jax import parallel
  from clead_jax.evaluation import workdir as workdir_lib
  datasets, meshes = {}, []

  def final_weights(directory, config):
    key = config.data.to_json_best_effort(sort_keys=True)
    if key not in datasets:
      datasets[key] = input_pipeline.load_dataset(config.data)
    if not meshes:
      meshes.append(parallel.make_mesh())
    return workdir_lib.final_weights_fingerprint(directory, config, datasets[key], meshes[0])
  return final_weights


@dataclasses.dataclass(frozen=True)
class Run:
  """One run of a study's plan: its index (as --run_index names it), variant, seed, config and
  workdir; `needs`: the index of the run whose model is its transfer surrogate, if any."""
  index: int
  variant: Variant
  seed: int
  config: Any
  directory: str
  needs: Optional[int] = None

  @property
  def key(self):
    return (self.variant, self.seed)

  @property
  def label(self):
    return f"{self.variant.label} seed {self.seed}"


def plan(config, workdir, methods, num_seeds, sweeps=(), baselines=()):
  """(variants, seeds, runs) of a study; every run's config is checked before any work."""
  seeds = [config.seed + k for k in range(num_seeds)]
  variants = make_variants(config, methods, sweeps, baselines)
  # The surrogate of the transfer attack trains before the runs that use it.
  variants.sort(key=lambda v: v.method != SURROGATE_METHOD or bool(v.overrides))
  pairs = [(v, s, run_config(config, v, s, workdir)) for v in variants for s in seeds]
  for _, _, run_cfg in pairs:  # every config error before any work
    config_checks.validate(run_cfg)
  index_of = {run_dir(workdir, v, s): i for i, (v, s, _) in enumerate(pairs)}
  runs = [Run(i, v, s, c, run_dir(workdir, v, s), index_of.get(c.eval.surrogate or None))
          for i, (v, s, c) in enumerate(pairs)]
  return variants, seeds, runs


PLAN = "plan.json"


def plan_dict(workdir, runs):
  """What DIR/plan.json holds: one entry per run, and a fingerprint of every run's config, by
  which a later --run_index or --collect knows it belongs to the same study."""
  entries = [{"index": r.index, "label": r.label, "method": r.variant.method, "seed": r.seed,
              "settings": dict(r.variant.settings),
              "workdir": os.path.relpath(r.directory, workdir), "needs": r.needs}
             for r in runs]
  configs = [provenance.config_fingerprint(r.config) + r.config.eval.attacks
             + str(r.config.eval.num_examples) for r in runs]
  return {"runs": entries, "study_fingerprint": provenance.config_fingerprint(
      {"runs": configs})}


def write_plan(workdir, runs, is_writer=True):
  """Writes DIR/plan.json, or checks that the one there is of this study; returns the plan."""
  wanted = plan_dict(workdir, runs)
  path = os.path.join(workdir, PLAN)
  if os.path.exists(path):
    try:
      with open(path) as f:
        existing = json.load(f)
    except (OSError, ValueError) as e:
      raise UserError(f"{path} cannot be read ({e}); remove it to write the plan again") from None
    if existing != wanted:
      raise UserError(f"{path} is the plan of another study (other methods, seeds, sweeps or "
                      "config); use the same study command, or another --workdir")
    return wanted
  if is_writer:
    os.makedirs(workdir, exist_ok=True)
    config_tools.atomic_write(path, json.dumps(wanted, indent=2) + "\n")
  return wanted


def read_finished(runs, final_weights=None):
  """(reports, stale) of the runs that finished earlier: {key: report} of those whose report is
  their final evaluation, {key: why} of those whose report is not (see stale_because)."""
  # Runs that finished earlier are read first, so a changed config stops the study before any work.
  reports = {r.key: finished_report(r.directory, r.config) for r in runs}
  reports = {k: v for k, v in reports.items() if v is not None}
  final_weights = final_weights or _final_weights_reader()
  stale = {}
  for run in runs:
    if run.key in reports:
      why = stale_because(reports[run.key], run.config,
                          lambda r=run: final_weights(r.directory, r.config))
      if why:
        stale[run.key] = why
        del reports[run.key]
  return reports, stale


def _summary_writer(config, workdir, variants, seeds, runs, sweeps, note, command, is_writer,
                    start):
  """refresh(reports, failures, plots) -> the summary, written to DIR when `is_writer`."""
  def refresh(reports, failures, plots):
    examples = {r.key: report_lib.read_examples(r.directory) for r in runs if r.key in reports}
    missing = [r.label for r in runs if r.key not in reports and r.key not in failures]
    summary = tables.summarize(config, variants, seeds, reports, failures, sweeps, note, command,
                               time.time() - start, examples, missing)
    if is_writer:
      tables.write_study(workdir, summary, plots)
    return summary
  return refresh


def _train_one(run, where, train_fn, say, stale):
  """Trains and evaluates one run (or evaluates it again when `stale` says why); returns its
  report. A UserError (a non-finite loss, ...) and a stop propagate."""
  if stale:
    say(f"study: {where}: its report is stale ({stale}); evaluating the final checkpoint again")
  else:
    say(f"study: {where}: training in {run.directory}")
  report = train_fn(run.config, run.directory)
  say(f"study: {where}: done ({_short(report)})")
  return report


def run_study(config, workdir, methods, num_seeds, sweeps=(), baselines=(), note=None,
              command=None, train_fn=None, is_writer=True, final_weights=None):
  """Trains and evaluates every run not yet finished, one after another; writes and returns the
  summary.

  final_weights(directory, config) -> (fingerprint, step) of a run's latest checkpoint (default:
  restored from it), with which a finished run's report is checked (`stale_because`).

  A stop (SIGINT/SIGTERM) ends the run in progress as training does, writes the summary of the
  finished runs and raises stopping.Stopped.
  """
  train_fn = train_fn or train.train_and_evaluate
  say = (lambda text: print(text, flush=True)) if is_writer else (lambda text: None)
  start = time.time()
  variants, seeds, runs = plan(config, workdir, methods, num_seeds, sweeps, baselines)
  reports, stale = read_finished(runs, final_weights)
  failures = {}
  refresh = _summary_writer(config, workdir, variants, seeds, runs, sweeps, note, command,
                            is_writer, start)
  say(f"study: {len(runs)} runs, {len(reports)} finished earlier; writing {workdir}")
  for run in runs:
    where = f"[{run.index + 1}/{len(runs)}] {run.label}"
    if run.key in reports:
      say(f"study: {where}: finished earlier ({_short(reports[run.key])}), skipped")
      continue
    try:
      reports[run.key] = _train_one(run, where, train_fn, say, stale.get(run.key))
    except UserError as e:  # e.g. a non-finite loss: record it, go on with the others
      failures[run.key] = str(e)
      say(f"study: {where}: FAILED: {e}")
    except stopping.Stopped as stopped:
      refresh(reports, failures, plots=False)
      this_run = stopped.what_was_kept.split("; run the same command")[0]
      stopped.what_was_kept = (f"study run {where}: {this_run}; the {len(reports)} finished "
                               f"runs are summarised in {tables.stem_path(workdir, sweeps)}.md; "
                               "run the same study command to resume")
      # Finished runs were kept: the study's exit is 0 even when this run had not started.
      stopped.nothing_ran = stopped.nothing_ran and not reports
      raise
    refresh(reports, failures, plots=False)  # the table after every run; the plots at the end
  summary = refresh(reports, failures, plots=True)
  say(f"study: wrote {os.path.join(workdir, tables.stem(summary))}.md")
  return summary


# --- a study spread over a scheduler: the plan, one run, the collection -------------------------

def print_plan(config, workdir, methods, num_seeds, sweeps=(), baselines=(), is_writer=True):
  """Writes DIR/plan.json and prints one line per run; returns the plan."""
  _, _, runs = plan(config, workdir, methods, num_seeds, sweeps, baselines)
  written = write_plan(workdir, runs, is_writer)
  if is_writer:
    for entry in written["runs"]:
      needs = ("" if entry["needs"] is None
               else f"\tafter run {entry['needs']} (its transfer surrogate)")
      print(f"{entry['index']}\t{entry['label']}\tseed {entry['seed']}\t{entry['workdir']}{needs}",
            flush=True)
  return written


SURROGATE_POLL_S = 10.0


def run_index(config, workdir, methods, num_seeds, index, sweeps=(), baselines=(),
              train_fn=None, is_writer=True, final_weights=None, surrogate_wait_s=0.0):
  """Trains and evaluates run `index` of the plan only (resuming it; nothing if it is finished);
  returns its report. Writes nothing shared but DIR/plan.json when it is not there yet. A run
  whose transfer surrogate (another run of the plan) has not finished waits for it up to
  `surrogate_wait_s`, then says so (UserError)."""
  train_fn = train_fn or train.train_and_evaluate
  say = (lambda text: print(text, flush=True)) if is_writer else (lambda text: None)
  _, _, runs = plan(config, workdir, methods, num_seeds, sweeps, baselines)
  if not 0 <= index < len(runs):
    raise UserError(f"--run_index={index}: the study has runs 0 to {len(runs) - 1} (see --plan)")
  write_plan(workdir, runs, is_writer)
  run = runs[index]
  where = f"[run {index} of 0-{len(runs) - 1}] {run.label}"
  if run.needs is not None:
    surrogate = runs[run.needs]
    deadline = time.time() + surrogate_wait_s
    while not read_finished([surrogate], final_weights)[0]:
      if time.time() >= deadline:
        raise UserError(
            f"--run_index={index} ({run.label}) needs its transfer surrogate, run {run.needs} "
            f"({surrogate.label}), which has not finished; run --run_index={run.needs} first "
            "(launch/study_slurm.sh submits it first) or wait for it with --surrogate_wait_s")
      say(f"study: {where}: waiting for its surrogate, run {run.needs} ({surrogate.label})")
      time.sleep(min(SURROGATE_POLL_S, max(0.0, deadline - time.time())))
  reports, stale = read_finished([run], final_weights)
  if run.key in reports:
    say(f"study: {where}: finished earlier ({_short(reports[run.key])}); nothing to do")
    return reports[run.key]
  return _train_one(run, where, train_fn, say, stale.get(run.key))


def collect(config, workdir, methods, num_seeds, sweeps=(), baselines=(), note=None,
            command=None, is_writer=True, final_weights=None):
  """Writes the summary (table, JSON, plots) of the runs that have finished, listing the others;
  trains nothing. Returns the summary."""
  say = (lambda text: print(text, flush=True)) if is_writer else (lambda text: None)
  variants, seeds, runs = plan(config, workdir, methods, num_seeds, sweeps, baselines)
  write_plan(workdir, runs, is_writer)
  reports, stale = read_finished(runs, final_weights)
  refresh = _summary_writer(config, workdir, variants, seeds, runs, sweeps, note, command,
                            is_writer, time.time())
  summary = refresh(reports, {}, plots=True)
  for run in runs:
    if run.key not in reports:
      why = f"its report is stale: {stale[run.key]}" if run.key in stale else "not finished"
      say(f"study: run {run.index} ({run.label}): {why}")
  say(f"study: {len(reports)} of {len(runs)} runs finished; wrote "
      f"{os.path.join(workdir, tables.stem(summary))}.md")
  return summary


def _short(report):
  parts = [f"clean {report['clean_accuracy']:.3f}"]
  parts += [f"{name} {report['robust_accuracy'][name]:.3f}" for name in ("pgd20", "autoattack")
            if name in report["robust_accuracy"]]
  return ", ".join(parts)


