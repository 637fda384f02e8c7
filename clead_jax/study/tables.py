"""The study's summary: statistics over seeds, per-seed paired differences to PGD-AT, the markdown
table (study.md), the JSON file (study.json) and two plots. Pure functions of the runs' reports;
study/runs.py runs the study and calls write_study after every run.
"""

import json
import os

import matplotlib
import numpy as np

from clead_jax import config_tools

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

# The attacks in the order the every-attack table lists them (others follow, sorted).
ATTACK_ORDER = ("fgsm", "pgd20", "pgd100", "cw", "autoattack", "transfer_pgd3")
# The main table's columns: (report key, heading); None is clean accuracy.
COLUMNS = ((None, "clean"), ("pgd20", "PGD-20"), ("autoattack", "AutoAttack"),
           ("transfer_pgd3", "transfer PGD-3 (paper's protocol)"))
WORST_CASE = "worst_case"  # paired_difference's key for the per-run worst case
REFERENCE_METHOD = "pgd_at"  # the Δ column compares each row's robust accuracy with this method's


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


def _white_box(report, attack_names):
  """Top-level attacks of the report (not AutoAttack's stage keys) that are not transfer attacks."""
  transfer = report.get("transfer_attacks", {})
  return [a for a in attack_names if "/" not in a and a not in transfer]


def _threat_model(report):
  """What a row's accuracies are measured under: norm, epsilon and evaluated points."""
  return {"norm": report.get("norm"), "epsilon": report.get("epsilon"),
          "num_examples": report.get("num_examples")}


def shared_white_box(reports):
  """The white-box attacks (top level, not transfer) that every report of the table holds, in
  the table's order: the worst case of every run is over this one set."""
  sets = [set(_white_box(r, r["robust_accuracy"])) for r in reports]
  shared = set.intersection(*sets) if sets else set()
  return [a for a in ATTACK_ORDER if a in shared] + sorted(shared - set(ATTACK_ORDER))


def worst_case_flags(flags, attacks):
  """Per example, whether the point survives every attack of `attacks` (and is classified
  correctly): `flags` is a run's per-example results (report.read_examples)."""
  robust = flags["clean"].copy()
  for name in attacks:
    robust &= flags[name]
  return robust


def _worst_case(report, flags, attacks, per_example):
  """The run's worst case over `attacks`: per example (a point counts only if every attack
  failed on it) when every run of the table has its per-example flags, else the lowest of the
  attacks' accuracies (for every run alike)."""
  if per_example:
    return float(np.mean(worst_case_flags(flags, attacks)))
  return min(report["robust_accuracy"][a] for a in attacks)


def summarize(config, variants, seeds, reports, failures, sweeps, note, command, wall_time_s,
              examples=None, missing=()):
  """The study's summary. `examples`: {(variant, seed): the run's per-example flags
  (report.read_examples) or None}; `missing`: labels of the runs not finished (nor failed)."""
  examples = examples or {}
  finished = [reports[(v, s)] for v in variants for s in seeds if (v, s) in reports]
  shared = shared_white_box(finished)
  per_example = bool(shared) and all(
      (examples.get((v, s)) or {}).keys() >= {"clean", *shared}
      for v in variants for s in seeds if (v, s) in reports)
  rows = []
  for variant in variants:
    done = [(s, reports[(variant, s)]) for s in seeds if (variant, s) in reports]
    attack_names = sorted(set.intersection(*[set(r["robust_accuracy"]) for _, r in done])
                          if done else set())
    worst = [_worst_case(r, examples.get((variant, s)), shared, per_example) if shared else None
             for s, r in done]
    rows.append({
        "label": variant.label, "method": variant.method, "settings": dict(variant.settings),
        "path": variant.path,
        "threat_model": _threat_model(done[0][1]) if done else None,
        "seeds_finished": [s for s, _ in done],
        "seeds_failed": {str(s): failures[(variant, s)] for s in seeds if (variant, s) in failures},
        "clean_accuracy": _stats([r["clean_accuracy"] for _, r in done]),
        "robust_accuracy": {a: _stats([r["robust_accuracy"][a] for _, r in done])
                            for a in attack_names},
        "worst_case_accuracy": _stats(worst) if shared and done else None,
        "worst_case_per_example": per_example,
        "robustness_curve": _curve_stats([r.get("robustness_curve") for _, r in done]),
        "runs": [{"seed": s, "workdir": os.path.join(variant.path, f"seed{s}"),
                  "clean_accuracy": r["clean_accuracy"], "robust_accuracy": r["robust_accuracy"],
                  "worst_case_accuracy": w, "steps": r["steps"],
                  "train_time_s": r["train_time_s"], "eval_time_s": r["eval_time_s"],
                  "weights_fingerprint": r.get("evaluation", {}).get("weights_fingerprint"),
                  "config_fingerprint": r.get("evaluation", {}).get("config_fingerprint")}
                 for (s, r), w in zip(done, worst)],
    })
  return {
      "dataset": config.data.name, "model": config.model.name, "norm": config.attack.norm,
      "epsilon": float(config.attack.epsilon), "eval_attacks": config.eval.attacks,
      "num_examples": int(config.eval.num_examples), "seeds": seeds,
      "sweeps": {field: values for field, values in sweeps}, "note": note,
      "command": command, "wall_time_s": wall_time_s,
      "worst_case_attacks": shared, "worst_case_per_example": per_example,
      "missing_runs": list(missing), "rows": rows,
  }


def stem(summary):
  return "_".join(["study"] + list(summary["sweeps"]))


def stem_path(workdir, sweeps):
  """DIR/study[_field...], where the summary of a study with `sweeps` is written."""
  return os.path.join(workdir, "_".join(["study"] + [field for field, _ in sweeps]))


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


def _reference(summary, row=None):
  """The reference row (REFERENCE_METHOD) that `row` is compared with: one of the same threat
  model (norm, epsilon, points), without swept settings if there is one, else with the row's
  own settings; None if there is none. Without `row`: the plain reference row."""
  candidates = [r for r in summary["rows"] if r["method"] == REFERENCE_METHOD
                and r["seeds_finished"]]
  if row is None:
    return next((r for r in candidates if not r["settings"]), None)
  same = [r for r in candidates if r["threat_model"] == row["threat_model"]]
  return (next((r for r in same if not r["settings"]), None)
          or next((r for r in same if r["settings"] == row["settings"]), None))


def _threat_models_differ(summary):
  models = {json.dumps(r["threat_model"], sort_keys=True) for r in summary["rows"]
            if r["threat_model"]}
  return len(models) > 1


def _threat_cell(threat):
  if not threat:
    return "—"
  return f"{threat['norm']} {threat['epsilon']:.4g}, {threat['num_examples']} points"


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
  any_reference = any(_reference(summary, row) is not None for row in summary["rows"])
  differ = _threat_models_differ(summary)
  heading = dict(COLUMNS)[key]
  examples = ("the whole test split" if summary["num_examples"] < 0
              else f"the first {summary['num_examples']} test examples")
  title_threat = ("threat model per row" if differ else
                  f"{summary['norm']} epsilon = {summary['epsilon']:.6g}")
  lines = [
      f"# Study: {summary['dataset']} ({summary['model']}), {title_threat}",
      "",
      f"Accuracy in % on {examples}, mean ± sample standard deviation over seeds "
      f"{summary['seeds']}; attacks {summary['eval_attacks']}.",
      "",
  ]
  if summary["command"]:
    lines += [f"Command: `{summary['command']}`", ""]
  if summary["note"]:
    lines += [f"Note: {summary['note']}", ""]
  if any_reference:
    lines += [f"Per-seed Δ: the differences to {REFERENCE_METHOD} seed by seed (a seed gives every "
              "method the same initialisation and batch order), their mean ± standard error, and "
              "in how many seeds the row is ahead; only between rows of the same threat model "
              "(norm, epsilon) and evaluation points: '—' where no "
              f"{REFERENCE_METHOD} row shares the row's.", ""]
  found = {a for r in summary["rows"] for a in r["robust_accuracy"]}
  columns = [(k, h) for k, h in COLUMNS if k is None or k in found or k != "transfer_pgd3"]
  if "transfer_pgd3" in found:
    lines += ["The transfer column is the paper's protocol: PGD-3 (step 3/8 epsilon, no random "
              "start) on the study's standard model, shown to each model; it is black-box and "
              "never enters the worst case.", ""]
  header = (["method"] + (["threat model"] if differ else []) + [h for _, h in columns]
            + ["seeds"])
  if any_reference:
    header.append(f"Δ {heading} vs {REFERENCE_METHOD}")
    header.append("per-seed Δ: mean ± s.e.")
  lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for row in summary["rows"]:
    reference = _reference(summary, row)
    cells = [row["label"]] + ([_threat_cell(row["threat_model"])] if differ else [])
    cells.append(_pct(row["clean_accuracy"]))
    cells += [_pct(row["robust_accuracy"].get(k)) for k, _ in columns[1:]]
    seeds = f"{len(row['seeds_finished'])}/{len(summary['seeds'])}"
    if row["seeds_failed"]:
      seeds += f" ({len(row['seeds_failed'])} failed)"
    cells.append(seeds)
    if any_reference:
      ours = row["robust_accuracy"].get(key)
      theirs = reference["robust_accuracy"].get(key) if reference else None
      cells.append("—" if not ours or not theirs else
                   f"{100 * (ours['mean'] - theirs['mean']):+.1f}")
      cells.append("—" if reference is None or row is reference else
                   _paired_cell(paired_difference(row, reference, key)))
    lines.append("| " + " | ".join(cells) + " |")
  attack_names = [a for a in ATTACK_ORDER if a in found] + sorted(found - set(ATTACK_ORDER))
  if attack_names:
    shared = ", ".join(summary.get("worst_case_attacks", [])) or "none"
    if summary.get("worst_case_per_example"):
      worst = (f"the fraction of points that every attack of {shared} failed on, per example, "
               "the same attacks for every run")
    else:
      worst = (f"the lowest accuracy of each run over {shared}, the same attacks for every run "
               "(not every run has its per-example results)")
    header = ["method"] + [f"{a} (transfer)" if a == "transfer_pgd3" else a
                           for a in attack_names] + ["worst case (white-box)"]
    if any_reference:
      header.append(f"per-seed Δ worst case vs {REFERENCE_METHOD}")
    lines += ["", f"Every attack (the worst case is {worst}; then averaged over seeds):", "",
              "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in summary["rows"]:
      reference = _reference(summary, row)
      cells = [row["label"]] + [_pct(row["robust_accuracy"].get(a)) for a in attack_names]
      cells.append(_pct(row["worst_case_accuracy"]))
      if any_reference:
        cells.append("—" if reference is None or row is reference else
                     _paired_cell(paired_difference(row, reference, WORST_CASE)))
      lines.append("| " + " | ".join(cells) + " |")
  for row in summary["rows"]:
    for seed, error in row["seeds_failed"].items():
      lines += ["", f"FAILED: {row['label']} seed {seed}: {error}"]
  if summary.get("missing_runs"):
    lines += ["", "Not finished (not in the table): " + ", ".join(summary["missing_runs"]) + "."]
  run_time = sum(run["train_time_s"] + run["eval_time_s"] for r in summary["rows"]
                 for run in r["runs"])
  lines += ["", f"Plots: {stem(summary)}_robust_vs_clean.png, {stem(summary)}_curves.png. "
            f"Training and evaluation time of the runs: {run_time / 60:.1f} min; "
            f"this invocation: {summary['wall_time_s'] / 60:.1f} min.", ""]
  return "\n".join(lines)


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
  config_tools.save_figure(fig, path)


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
  config_tools.save_figure(fig, path)


def write_study(workdir, summary, plots=True):
  name = os.path.join(workdir, stem(summary))
  os.makedirs(workdir, exist_ok=True)
  config_tools.atomic_write(name + ".json", json.dumps(summary, indent=2) + "\n")
  config_tools.atomic_write(name + ".md", to_markdown(summary))
  if plots:
    plot_robust_vs_clean(summary, name + "_robust_vs_clean.png")
    plot_curves(summary, name + "_curves.png")
