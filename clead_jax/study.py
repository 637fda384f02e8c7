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
A run whose report.json exists is not repeated (its config.json must match, else an error names
the differing fields); an unfinished one resumes from its checkpoints. The table and the JSON
file are rewritten after every run, the plots at the end. Only process 0 prints and writes.
"""

import dataclasses
import itertools
import json
import os
import shlex
import sys
import time

from absl import flags
import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from clead_jax import attacks  # pylint: disable=g-import-not-at-top,wrong-import-position
from clead_jax import command_line  # pylint: disable=g-import-not-at-top,wrong-import-position
from clead_jax import config_checks  # pylint: disable=g-import-not-at-top,wrong-import-position
from clead_jax import distributed  # pylint: disable=g-import-not-at-top,wrong-import-position
from clead_jax import objectives  # pylint: disable=g-import-not-at-top,wrong-import-position
from clead_jax import train  # pylint: disable=g-import-not-at-top,wrong-import-position
from clead_jax.errors import UserError  # pylint: disable=g-import-not-at-top,wrong-import-position

# The evaluation suite of a study; 'autoattack' (AutoAttack, standard version) when registered.
SUITE = ("fgsm", "pgd20", "pgd100", "cw", "autoattack")
# The table's columns: (report key, heading); None is clean accuracy.
COLUMNS = ((None, "clean"), ("pgd20", "PGD-20"), ("autoattack", "AutoAttack"))
WORST_CASE = "worst_case"  # paired_difference's key for the per-run worst case
REFERENCE_METHOD = "pgd_at"  # the Δ column compares each row's robust accuracy with this method's
_NO_SWEEP_FIELDS = ("method", "seed")  # set by --methods and --seeds
# Fields a finished run may differ in and still count as done: they change neither the training
# nor the report.
_REPORT_NEUTRAL_FIELDS = ("train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
                          "data.data_dir", "data.download", "compilation_cache_dir",
                          "eval.batch_size")


def default_eval_attacks():
  """(config.eval.attacks for the study, a note for study.md or None)."""
  available = [name for name in SUITE if name in attacks.EVAL_ATTACKS]
  note = None
  if "autoattack" not in available:
    note = ("AutoAttack is not registered in clead_jax.attacks.EVAL_ATTACKS in this version: the "
            "AutoAttack column is empty and robust accuracy falls back to "
            + ", ".join(available) + ".")
  return ",".join(available), note


# --- parsing --------------------------------------------------------------------------------------

def parse_methods(text, flag="--methods"):
  methods = [m.strip() for m in text.split(",") if m.strip()]
  unknown = [m for m in methods if m not in objectives.METHODS]
  if unknown:
    raise UserError(f"{flag}: unknown method(s) {unknown}; choose from "
                    f"{sorted(objectives.METHODS)}")
  if len(set(methods)) != len(methods):
    raise UserError(f"{flag}={text!r} names a method twice")
  return methods


def _get(config, field):
  node = config
  for part in field.split("."):
    if not hasattr(node, "keys") or part not in node:
      raise KeyError(part)
    node = node[part]
  return node


def _set(config, field, value):
  *parents, leaf = field.split(".")
  node = config
  for part in parents:
    node = node[part]
  node[leaf] = value


def _parse_value(text, like, field):
  """`text` as the type of the field's current value `like`."""
  try:
    if isinstance(like, bool):
      if text.lower() not in ("true", "false", "1", "0"):
        raise ValueError
      return text.lower() in ("true", "1")
    if isinstance(like, int):
      return int(text)
    if isinstance(like, float):
      return float(text)
    if isinstance(like, str):
      return text
  except ValueError:
    raise UserError(f"--sweep config.{field}: {text!r} is not a {type(like).__name__}") from None
  raise UserError(f"--sweep config.{field}: fields of type {type(like).__name__} cannot be swept")


def parse_sweep(spec, config):
  """'config.a.b=v1,v2' -> ('a.b', [v1, v2]) with values of the field's type."""
  field, sep, values = spec.partition("=")
  field = field.strip().removeprefix("config.")
  if not sep or not field or not values.strip():
    raise UserError(f"--sweep {spec!r}: expected config.field=v1,v2,...")
  if field in _NO_SWEEP_FIELDS:
    raise UserError(f"--sweep {spec!r}: set config.{field} with --{field}s, not --sweep")
  try:
    like = _get(config, field)
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
      overrides = tuple((f, v) for f, v in settings if v != _get(config, f))
      variants.append(Variant(method, settings, overrides))
  return list(dict.fromkeys(variants))  # a baseline also in --methods, once


def run_config(config, variant, seed):
  config = config.copy_and_resolve_references()
  config.method = variant.method
  config.seed = seed
  for field, value in variant.overrides:
    _set(config, field, value)
  return config


def _flatten(tree, prefix=""):
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[prefix + key] = value
  return flat


def finished_report(run_dir, config):
  """The run's report if it finished with this config; None if it has not finished."""
  report_path = os.path.join(run_dir, "report.json")
  if not os.path.exists(report_path):
    return None
  with open(os.path.join(run_dir, "config.json")) as f:
    on_disk = _flatten(json.load(f))
  wanted = _flatten(json.loads(config.to_json_best_effort(sort_keys=True)))
  differing = sorted(k for k in on_disk.keys() | wanted.keys()
                     if on_disk.get(k) != wanted.get(k) and k not in _REPORT_NEUTRAL_FIELDS)
  if differing:
    raise UserError(f"{run_dir} holds a finished run with another config (config."
                    + ", config.".join(differing[:5]) + (", ..." if len(differing) > 5 else "")
                    + "); use another --workdir or remove that run")
  with open(report_path) as f:
    return json.load(f)


def run_study(config, workdir, methods, num_seeds, sweeps=(), baselines=(), note=None,
              command=None, train_fn=None, is_writer=True):
  """Trains and evaluates every run not yet finished; writes and returns the summary."""
  train_fn = train_fn or train.train_and_evaluate
  say = (lambda text: print(text, flush=True)) if is_writer else (lambda text: None)
  start = time.time()
  seeds = [config.seed + k for k in range(num_seeds)]
  variants = make_variants(config, methods, sweeps, baselines)
  runs = [(v, s, run_config(config, v, s), os.path.join(workdir, v.path, f"seed{s}"))
          for v in variants for s in seeds]
  for _, _, run_cfg, _ in runs:  # every config error before any work
    config_checks.validate(run_cfg)
  # Runs that finished earlier are read first, so a changed config stops the study before any work.
  reports = {(v, s): finished_report(d, c) for v, s, c, d in runs}
  reports = {k: r for k, r in reports.items() if r is not None}
  failures = {}

  def refresh(plots):
    summary = summarize(config, variants, seeds, reports, failures, sweeps, note, command,
                        time.time() - start)
    if is_writer:
      write_study(workdir, summary, plots)
    return summary

  say(f"study: {len(runs)} runs, {len(reports)} finished earlier; writing {workdir}")
  for index, (variant, seed, run_cfg, run_dir) in enumerate(runs, 1):
    where = f"[{index}/{len(runs)}] {variant.label} seed {seed}"
    if (variant, seed) in reports:
      say(f"study: {where}: finished earlier ({_short(reports[(variant, seed)])}), skipped")
      continue
    say(f"study: {where}: training in {run_dir}")
    try:
      report = train_fn(run_cfg, run_dir)
    except UserError as e:  # e.g. a non-finite loss: record it, go on with the others
      failures[(variant, seed)] = str(e)
      say(f"study: {where}: FAILED: {e}")
    else:
      if "stopped_at" in report:  # SIGTERM/SIGINT: the run checkpointed; so does the study
        say(f"study: {where}: stopped at step {report['stopped_at']}; run the same command "
            "again to resume")
        break
      reports[(variant, seed)] = report
      say(f"study: {where}: done ({_short(report)})")
    refresh(plots=False)  # the table after every run; the plots once, at the end
  summary = refresh(plots=True)
  say(f"study: wrote {os.path.join(workdir, stem(summary))}.md")
  return summary


def _short(report):
  parts = [f"clean {report['clean_accuracy']:.3f}"]
  parts += [f"{name} {report['robust_accuracy'][name]:.3f}" for name in ("pgd20", "autoattack")
            if name in report["robust_accuracy"]]
  return ", ".join(parts)


# --- the summary ----------------------------------------------------------------------------------

def _stats(values):
  """mean and sample standard deviation (None for a single value)."""
  values = [float(v) for v in values]
  if not values:
    return None
  std = float(np.std(values, ddof=1)) if len(values) > 1 else None
  return {"mean": float(np.mean(values)), "std": std, "n": len(values), "values": values}


def _curve_stats(curves):
  curves = [c for c in curves if c]
  if not curves or any(c["epsilon"] != curves[0]["epsilon"] or c["attack"] != curves[0]["attack"]
                       for c in curves):
    return None
  accuracy = np.array([c["accuracy"] for c in curves], dtype=np.float64)
  std = accuracy.std(axis=0, ddof=1) if len(curves) > 1 else np.zeros(accuracy.shape[1])
  return {"attack": curves[0]["attack"], "epsilon": curves[0]["epsilon"],
          "mean": accuracy.mean(axis=0).tolist(), "std": std.tolist(), "n": len(curves)}


def _worst_case(report, top_level):
  """Per example (a point counts only if every attack failed on it) where the report has it;
  reports written before that field existed give the lowest accuracy of any attack."""
  if "worst_case_accuracy" in report:
    return report["worst_case_accuracy"]
  return min(report["robust_accuracy"][a] for a in top_level)


def summarize(config, variants, seeds, reports, failures, sweeps, note, command, wall_time_s):
  rows = []
  for variant in variants:
    done = [(s, reports[(variant, s)]) for s in seeds if (variant, s) in reports]
    attack_names = sorted(set.intersection(*[set(r["robust_accuracy"]) for _, r in done])
                          if done else set())
    top_level = [a for a in attack_names if "/" not in a]  # not AutoAttack's per-stage keys
    worst = [_worst_case(r, top_level) if top_level else None for _, r in done]
    rows.append({
        "label": variant.label, "method": variant.method, "settings": dict(variant.settings),
        "path": variant.path,
        "seeds_finished": [s for s, _ in done],
        "seeds_failed": {str(s): failures[(variant, s)] for s in seeds if (variant, s) in failures},
        "clean_accuracy": _stats([r["clean_accuracy"] for _, r in done]),
        "robust_accuracy": {a: _stats([r["robust_accuracy"][a] for _, r in done])
                            for a in attack_names},
        "worst_case_accuracy": _stats(worst) if top_level else None,
        "worst_case_per_example": bool(done) and all("worst_case_accuracy" in r for _, r in done),
        "robustness_curve": _curve_stats([r.get("robustness_curve") for _, r in done]),
        "runs": [{"seed": s, "workdir": os.path.join(variant.path, f"seed{s}"),
                  "clean_accuracy": r["clean_accuracy"], "robust_accuracy": r["robust_accuracy"],
                  "worst_case_accuracy": w, "steps": r["steps"],
                  "train_time_s": r["train_time_s"], "eval_time_s": r["eval_time_s"]}
                 for (s, r), w in zip(done, worst)],
    })
  return {
      "dataset": config.data.name, "model": config.model.name, "norm": config.attack.norm,
      "epsilon": float(config.attack.epsilon), "eval_attacks": config.eval.attacks,
      "num_examples": int(config.eval.num_examples), "seeds": seeds,
      "sweeps": {field: values for field, values in sweeps}, "note": note,
      "command": command, "wall_time_s": wall_time_s, "rows": rows,
  }


def stem(summary):
  return "_".join(["study"] + list(summary["sweeps"]))


def _pct(stats):
  if stats is None:
    return "—"
  if stats["std"] is None:
    return f"{100 * stats['mean']:.1f}"
  return f"{100 * stats['mean']:.1f} ± {100 * stats['std']:.1f}"


def _robust_key(summary):
  """AutoAttack where every row has it, else PGD-20."""
  rows = [r for r in summary["rows"] if r["seeds_finished"]]
  if rows and all("autoattack" in r["robust_accuracy"] for r in rows):
    return "autoattack"
  return "pgd20"


def _reference(summary):
  for row in summary["rows"]:
    if row["method"] == REFERENCE_METHOD and not row["settings"] and row["seeds_finished"]:
      return row
  return None


def paired_difference(row, reference, key):
  """Per-seed differences of `key` (an attack, or WORST_CASE) between `row` and the reference
  row, over the seeds both finished (one seed shares the initialisation and the batch order
  across methods): {'seeds', 'differences', 'mean', 'standard_error' (None for one seed),
  'ahead'}."""
  value = lambda run: (run.get("worst_case_accuracy") if key == WORST_CASE
                       else run["robust_accuracy"].get(key))
  ours = {run["seed"]: value(run) for run in row["runs"]}
  theirs = {run["seed"]: value(run) for run in reference["runs"]}
  seeds = [s for s in ours if ours[s] is not None and theirs.get(s) is not None]
  if not seeds:
    return None
  differences = np.array([ours[s] - theirs[s] for s in seeds])
  error = (float(differences.std(ddof=1) / np.sqrt(len(seeds))) if len(seeds) > 1 else None)
  return {"seeds": seeds, "differences": differences.tolist(), "mean": float(differences.mean()),
          "standard_error": error, "ahead": int(np.sum(differences > 0))}


def _paired_cell(paired):
  if paired is None:
    return "—"
  error = "" if paired["standard_error"] is None else f" ± {100 * paired['standard_error']:.1f}"
  return (f"{100 * paired['mean']:+.1f}{error} "
          f"(ahead in {paired['ahead']}/{len(paired['seeds'])})")


def to_markdown(summary):
  key = _robust_key(summary)
  reference = _reference(summary)
  heading = dict(COLUMNS)[key]
  examples = ("the whole test split" if summary["num_examples"] < 0
              else f"the first {summary['num_examples']} test examples")
  lines = [
      f"# Study: {summary['dataset']} ({summary['model']}), {summary['norm']} "
      f"epsilon = {summary['epsilon']:.6g}",
      "",
      f"Accuracy in % on {examples}, mean ± sample standard deviation over seeds "
      f"{summary['seeds']}; attacks {summary['eval_attacks']}.",
      "",
  ]
  if summary["command"]:
    lines += [f"Command: `{summary['command']}`", ""]
  if summary["note"]:
    lines += [f"Note: {summary['note']}", ""]
  if reference is not None:
    lines += [f"Per-seed Δ: the differences to {REFERENCE_METHOD} seed by seed (a seed gives every "
              "method the same initialisation and batch order), their mean ± standard error, and "
              f"in how many seeds the row is ahead.", ""]
  header = ["method"] + [h for _, h in COLUMNS] + ["seeds"]
  if reference is not None:
    header.append(f"Δ {heading} vs {REFERENCE_METHOD}")
    header.append("per-seed Δ: mean ± s.e.")
  lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for row in summary["rows"]:
    cells = [row["label"], _pct(row["clean_accuracy"])]
    cells += [_pct(row["robust_accuracy"].get(k)) for k, _ in COLUMNS[1:]]
    seeds = f"{len(row['seeds_finished'])}/{len(summary['seeds'])}"
    if row["seeds_failed"]:
      seeds += f" ({len(row['seeds_failed'])} failed)"
    cells.append(seeds)
    if reference is not None:
      ours, theirs = row["robust_accuracy"].get(key), reference["robust_accuracy"].get(key)
      cells.append("—" if not ours or not theirs else
                   f"{100 * (ours['mean'] - theirs['mean']):+.1f}")
      cells.append("—" if row is reference else
                   _paired_cell(paired_difference(row, reference, key)))
    lines.append("| " + " | ".join(cells) + " |")
  found = {a for r in summary["rows"] for a in r["robust_accuracy"]}
  attack_names = [a for a in SUITE if a in found] + sorted(found - set(SUITE))
  if attack_names:
    per_example = [bool(r.get("worst_case_per_example")) for r in summary["rows"]]
    if all(per_example):
      worst = "the fraction of points that every attack of the run failed on, per example"
    elif not any(per_example):
      worst = "the lowest accuracy of each run over the suite's attacks"
    else:
      worst = ("per example for runs whose report has it, else the run's lowest accuracy over "
               "the suite's attacks")
    header = ["method"] + attack_names + ["worst case"]
    if reference is not None:
      header.append(f"per-seed Δ worst case vs {REFERENCE_METHOD}")
    lines += ["", f"Every attack (the worst case is {worst}; then averaged over seeds):", "",
              "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in summary["rows"]:
      cells = [row["label"]] + [_pct(row["robust_accuracy"].get(a)) for a in attack_names]
      cells.append(_pct(row["worst_case_accuracy"]))
      if reference is not None:
        cells.append("—" if row is reference else
                     _paired_cell(paired_difference(row, reference, WORST_CASE)))
      lines.append("| " + " | ".join(cells) + " |")
  for row in summary["rows"]:
    for seed, error in row["seeds_failed"].items():
      lines += ["", f"FAILED: {row['label']} seed {seed}: {error}"]
  run_time = sum(run["train_time_s"] + run["eval_time_s"] for r in summary["rows"]
                 for run in r["runs"])
  lines += ["", f"Plots: {stem(summary)}_robust_vs_clean.png, {stem(summary)}_curves.png. "
            f"Training and evaluation time of the runs: {run_time / 60:.1f} min; "
            f"this invocation: {summary['wall_time_s'] / 60:.1f} min.", ""]
  return "\n".join(lines)


def _save(fig, path):
  tmp = path + ".tmp.png"
  fig.tight_layout()
  fig.savefig(tmp, dpi=120)
  plt.close(fig)
  os.replace(tmp, path)


def plot_robust_vs_clean(summary, path):
  key = _robust_key(summary)
  fig, ax = plt.subplots(figsize=(6, 4.5))
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for i, row in enumerate(summary["rows"]):
    clean = row["clean_accuracy"]
    if clean is None:
      continue
    color = colors[i % len(colors)]
    markers = [(key, "o", "full")] + ([("pgd20", "s", "none")] if key != "pgd20" else [])
    for attack, marker, fill in markers:
      robust = row["robust_accuracy"].get(attack)
      if robust is None:
        continue
      ax.errorbar(clean["mean"], robust["mean"], xerr=clean["std"] or 0.0,
                  yerr=robust["std"] or 0.0, fmt=marker, fillstyle=fill, color=color,
                  capsize=3, label=row["label"] if attack == key else None)
  heading = dict(COLUMNS)[key]
  ax.set_xlabel("clean accuracy")
  ax.set_ylabel(f"robust accuracy ({heading}" + (", open squares: PGD-20)" if key != "pgd20"
                                                 else ")"))
  ax.set_title(f"{summary['dataset']}: robust vs clean, mean ± std over seeds")
  ax.legend(fontsize="small")
  ax.grid(alpha=0.3)
  _save(fig, path)


def plot_curves(summary, path):
  fig, ax = plt.subplots(figsize=(6, 4.5))
  attack = None
  for row in summary["rows"]:
    curve = row["robustness_curve"]
    if curve is None:
      continue
    attack = curve["attack"]
    eps, mean, std = (np.array(curve[k]) for k in ("epsilon", "mean", "std"))
    line, = ax.plot(eps, mean, marker="o", markersize=3, label=row["label"])
    ax.fill_between(eps, mean - std, mean + std, color=line.get_color(), alpha=0.2)
  ax.axvline(summary["epsilon"], color="grey", linestyle="--", label="training epsilon")
  ax.set_xlabel(f"epsilon ({summary['norm']})")
  ax.set_ylabel(f"accuracy under {attack or 'attack'}")
  ax.set_ylim(0, 1)
  ax.set_title(f"{summary['dataset']}: robustness curves, mean ± std over seeds")
  ax.legend(fontsize="small")
  ax.grid(alpha=0.3)
  _save(fig, path)


def _atomic_write(path, text):
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def write_study(workdir, summary, plots=True):
  name = os.path.join(workdir, stem(summary))
  os.makedirs(workdir, exist_ok=True)
  _atomic_write(name + ".json", json.dumps(summary, indent=2) + "\n")
  _atomic_write(name + ".md", to_markdown(summary))
  if plots:
    plot_robust_vs_clean(summary, name + "_robust_vs_clean.png")
    plot_curves(summary, name + "_curves.png")


# --- the command ----------------------------------------------------------------------------------

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.",
                                          lock_config=True)
# Another entry point imported in the same process (tests) may have defined --workdir already.
if "workdir" not in flags.FLAGS:
  flags.DEFINE_string("workdir", None,
                                  "Directory of the study: one sub-directory per run.")
_METHODS = flags.DEFINE_string("methods", "standard,pgd_at,trades,clead",
                               "Comma-separated methods (objectives.METHODS).")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Seeds per method: config.seed, config.seed + 1, ...")
_SWEEPS = flags.DEFINE_multi_string("sweep", [], "config.field=v1,v2,... (repeat for a grid).")
_BASELINES = flags.DEFINE_string(
    "baselines", "", "Comma-separated methods run without the sweep, as reference rows.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  command_line.start(argv)
  with command_line.user_errors_as_one_line():
    distributed.initialize(None, None, None)
    config = _CONFIG.value
    if _SEEDS.value < 1:
      raise UserError(f"--seeds={_SEEDS.value} must be >= 1")
    methods = parse_methods(_METHODS.value)
    baselines = parse_methods(_BASELINES.value, "--baselines") if _BASELINES.value else []
    sweeps = [parse_sweep(spec, config) for spec in _SWEEPS.value]
    if len({f for f, _ in sweeps}) != len(sweeps):
      raise UserError("--sweep names a field twice")
    note = None
    if not ("config.eval.attacks" in flags.FLAGS and flags.FLAGS["config.eval.attacks"].present):
      config.eval.attacks, note = default_eval_attacks()
    command = shlex.join(["python", "-m", "clead_jax.study"] + sys.argv[1:])
    summary = run_study(config, flags.FLAGS.workdir, methods, _SEEDS.value, sweeps, baselines, note,
                        command, is_writer=jax.process_index() == 0)
  failed = sum(len(row["seeds_failed"]) for row in summary["rows"])
  if failed:
    print(f"error: {failed} run(s) failed; see {stem(summary)}.md; the others are summarised",
          file=sys.stderr)
    sys.exit(1)


def run():
  command_line.run(main)


if __name__ == "__main__":
  run()
