"""The run's report: report.json (the contract later tools read), report.md, robustness_curve.png,
and report_examples.npz (per-example results, from which the worst case is computed).

Reports accumulate. An evaluation adds or replaces the entries of the attacks it ran and keeps
the others, as long as they were measured on the same evaluation: the same checkpoint, dataset,
epsilon, norm and examples (`identity`). Otherwise the old report is kept as
report.<step>.json (with its .md and examples file) and a new one starts. The worst case is
recomputed over every white-box attack whose per-example results are kept; transfer attacks
(black-box, from a surrogate) are listed apart and never enter it. Each attack records when and
by which command it was measured.

Files are written to a temporary name and renamed, so a crash never leaves a half-written report.
"""

import datetime
import json
import os
import shlex
import sys

import matplotlib
import numpy as np

from clead_jax import config_tools

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

REPORT = "report.json"
EXAMPLES = "report_examples.npz"
CROSSCHECK = "crosscheck"  # crosscheck.json and crosscheck.md (clead_jax/crosscheck.py)


def identity_difference(old, new) -> str:
  """Why an evaluation identity `old` (a report's 'evaluation') is not `new`, in words."""
  if not isinstance(old, dict):
    return "it has no readable evaluation identity"
  if "weights_fingerprint" not in old:
    return "it predates weight fingerprints, so its weights cannot be told apart"
  parts = []
  for key in sorted(set(old) | set(new)):
    if old.get(key) != new.get(key):
      label = {"weights_fingerprint": "weights", "config_fingerprint": "training config"}.get(
          key, key)
      parts.append(f"{label} {old.get(key)} -> {new.get(key)}")
  return "other " + "; ".join(parts) if parts else "it could not be read"


def command_line():
  """The command that is running, as a user would type it (for the report's provenance); no
  directory of this machine appears in it except those in the arguments."""
  program = sys.argv[0]
  parts = os.path.normpath(os.path.splitext(program)[0]).split(os.sep)
  if program.endswith(".py") and "clead_jax" in parts:
    module = ".".join(parts[parts.index("clead_jax"):]).removesuffix(".__main__")
    return shlex.join(["python", "-m", module] + sys.argv[1:])
  if program.endswith("__main__.py") and len(parts) > 1:  # python -m pytest, ...
    return shlex.join(["python", "-m", parts[-2]] + sys.argv[1:])
  return shlex.join([os.path.basename(program)] + sys.argv[1:])


def read_examples(workdir):
  """DIR/report_examples.npz as {attack: (n,) bool}, None if there is none."""
  path = os.path.join(workdir, EXAMPLES)
  if not os.path.exists(path):
    return None
  with np.load(path) as saved:
    return {k.replace("__", "/"): saved[k].astype(bool) for k in saved.files}


def _now():
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class Report:
  """One workdir's report: header fields, clean and per-attack per-example flags, extras.

  `identity` decides whether an existing report is continued (see the module docstring).
  Only the writer process writes files.
  """

  def __init__(self, workdir, header, identity, is_writer=True, read_existing=True):
    self.workdir = workdir
    self.is_writer = is_writer
    self.identity = dict(identity)
    self.data = {**header, "evaluation": self.identity, "robust_accuracy": {},
                 "attack_time_s": {}, "measured": {}, "transfer_attacks": {}}
    self.flags = {}  # name -> (n,) bool: correct clean ("clean") / correct clean and after it
    self.archived = None
    self.archived_because = None  # in words, when an earlier report was archived
    if read_existing and workdir:
      self._continue_or_archive()

  def announce_archive(self):
    """One line on stdout (writer only) when an earlier report of another evaluation was set
    aside: which directory, why, and where it is kept."""
    if self.archived and self.is_writer:
      print(f"clead_jax: the earlier report in {self.workdir} was of another evaluation "
            f"({self.archived_because}); kept as {os.path.join(self.workdir, self.archived)}",
            flush=True)

  # --- reading ---

  def _continue_or_archive(self):
    path = os.path.join(self.workdir, REPORT)
    if not os.path.exists(path):
      return
    try:
      with open(path) as f:
        old = json.load(f)
    except (OSError, ValueError):
      old = None
    if old is not None and old.get("evaluation") == self.identity:
      flags = read_examples(self.workdir) or {}
      for key in ("robust_accuracy", "attack_time_s", "measured", "transfer_attacks"):
        self.data[key] = dict(old.get(key, {}))
      # eval_time_s: the evaluation time spent on this report so far (a resumed evaluation adds
      # its own to it).
      for key in ("robustness_curve", "train_time_s", "compile_time_s", "eval_time_s"):
        if key in old:
          self.data.setdefault(key, old[key])
      self.flags = flags
      return
    if self.is_writer:
      self.archived_because = identity_difference((old or {}).get("evaluation"), self.identity)
      self.archived = self._archive(old)

  def _archive(self, old):
    """Keeps an old report of another evaluation as report.<step>[.k].json (md, npz too, and
    the cross-check of its AutoAttack, which is of the same weights)."""
    step = (old or {}).get("steps", "old")
    stem, k = f"report.{step}", 1
    while os.path.exists(os.path.join(self.workdir, stem + ".json")):
      k += 1
      stem = f"report.{step}.{k}"
    for name, suffix in ((REPORT, ".json"), ("report.md", ".md"), (EXAMPLES, ".examples.npz"),
                         (CROSSCHECK + ".json", ".crosscheck.json"),
                         (CROSSCHECK + ".md", ".crosscheck.md")):
      source = os.path.join(self.workdir, name)
      if os.path.exists(source):
        os.replace(source, os.path.join(self.workdir, stem + suffix))
    return stem + ".json"

  # --- adding ---

  @property
  def num_examples(self):
    return self.data["num_examples"]

  def set(self, **fields):
    self.data.update(fields)

  def add_clean(self, correct):
    self.flags["clean"] = np.asarray(correct, bool)
    self.data["clean_accuracy"] = float(np.mean(correct))

  def add_attack(self, name, robust, time_s, stages=None, transfer=None, stage_times_s=None):
    """`robust`: (n,) correct clean and after the attack; `stages`: {key: (n,) flags} of its
    stages (AutoAttack), with `stage_times_s` {key: seconds} where each stage ran in this
    process; `transfer`: what the black-box transfer came from (not in the worst case)."""
    for key, flags in {name: robust, **(stages or {})}.items():
      self.flags[key] = np.asarray(flags, bool)
      self.data["robust_accuracy"][key] = float(np.mean(flags))
    times = self.data["attack_time_s"]
    for key in [k for k in times if k.startswith(name + "/")]:
      del times[key]  # an earlier run's stage times of this attack
    times[name] = float(time_s)
    times.update({key: float(t) for key, t in (stage_times_s or {}).items()})
    self.data["measured"][name] = {"at": _now(), "command": command_line()}
    if transfer is not None:
      self.data["transfer_attacks"][name] = transfer
    else:
      self.data["transfer_attacks"].pop(name, None)

  def white_box_attacks(self):
    """Top-level attacks (not AutoAttack's stage keys) that are not transfer attacks."""
    return [a for a in self.data["robust_accuracy"]
            if "/" not in a and a not in self.data["transfer_attacks"]]

  def _worst_case(self):
    attacks = [a for a in self.white_box_attacks() if a in self.flags]
    if not attacks or "clean" not in self.flags:
      self.data.pop("worst_case_accuracy", None)
      self.data.pop("worst_case_attacks", None)
      return
    robust = self.flags["clean"].copy()
    for name in attacks:
      robust &= self.flags[name]
    self.data["worst_case_accuracy"] = float(np.mean(robust))
    self.data["worst_case_attacks"] = attacks

  def to_dict(self):
    self._worst_case()
    return json.loads(json.dumps(self.data))

  def write(self):
    """report.json, report.md, the examples file and the curve; returns the report dict."""
    report = self.to_dict()
    if self.is_writer and self.workdir:
      os.makedirs(self.workdir, exist_ok=True)
      write_report(self.workdir, report)
      arrays = {k.replace("/", "__"): v for k, v in self.flags.items()}
      tmp = os.path.join(self.workdir, EXAMPLES + ".tmp.npz")
      np.savez_compressed(tmp, **arrays)
      os.replace(tmp, os.path.join(self.workdir, EXAMPLES))
    return report


# --- the files -------------------------------------------------------------------------------------

def to_markdown(report: dict) -> str:
  eps = report["epsilon"]
  checkpoint = report.get("checkpoint")
  transfer = report.get("transfer_attacks", {})
  lines = [
      f"# Robustness report: {report['method']} on {report['dataset']} ({report['model']})",
      "",
      f"Threat model: {report['norm']}, epsilon = {eps:.6g}. "
      f"{report['num_examples']} test examples"
      # A model evaluated through clead_jax.robustness was not trained here.
      + (f"; {report['steps']} training steps." if "steps" in report else "."),
  ]
  if checkpoint:
    lines += ["", f"Checkpoint: step {checkpoint['step']} ({checkpoint['rule']})."]
  evaluation = report.get("evaluation", {})
  if evaluation.get("weights_fingerprint"):
    # A model given to clead_jax.robustness.evaluate has no training config here.
    config = evaluation.get("config_fingerprint")
    lines += ["", f"Weights fingerprint {evaluation['weights_fingerprint']}"
              f"{' (' + report['weights'] + ' weights)' if report.get('weights') else ''}"
              f"{', training config fingerprint ' + config if config else ''}."]
  lines += ["", "| attack | accuracy |", "|---|---|",
            f"| clean | {report.get('clean_accuracy', float('nan')):.4f} |"]
  for name, acc in report["robust_accuracy"].items():
    label = name
    if name in transfer:
      label += f" (black-box transfer from {transfer[name]['surrogate']}; not in the worst case)"
    lines.append(f"| {label} | {acc:.4f} |")
  if "worst_case_accuracy" in report:
    lines.append(f"| worst case per example ({', '.join(report['worst_case_attacks'])}) | "
                 f"{report['worst_case_accuracy']:.4f} |")
  times = report.get("attack_time_s")
  if times:
    lines += ["", "Attack times (s, compilation included): "
              + ", ".join(f"{name} {seconds:.1f}" for name, seconds in times.items())]
  measured = report.get("measured")
  if measured:
    lines += ["", "Measured:"] + [f"- {name}: {m['at']}, `{m['command']}`"
                                  for name, m in measured.items()]
  curve = report.get("robustness_curve")
  if curve:
    lines += ["", f"Robustness curve ({curve['attack']}): "
              + ", ".join(f"{e:.4g}: {a:.3f}" for e, a in zip(curve["epsilon"], curve["accuracy"]))]
  for warning in report.get("warnings", []):
    lines += ["", f"WARNING: {warning}"]
  lines += indicator_lines(report)
  trained = ("" if "train_time_s" not in report  # an imported checkpoint: not trained here
             else f"Train time {report['train_time_s']:.1f} s, ")
  lines += ["", f"{trained}{'e' if trained else 'E'}valuation time "
            f"{report.get('eval_time_s', 0.0):.1f} s.", ""]
  return "\n".join(lines)


def indicator_lines(report: dict) -> list:
  """report.md's lines on the indicators of attack failure: those that fired, each with what it
  means and what to do (clead_jax/evaluation/indicators.py; report.json keeps every number)."""
  block = report.get("indicators")
  if block is None:
    return []
  checked = ", ".join(block.get("attacks", {})) or "no PGD or APGD attack"
  if not block.get("fired"):
    return ["", f"Indicators of attack failure: none fired ({checked} and the model, on "
                f"{block['sample']})."]
  return (["", f"Indicators of attack failure that fired ({checked} and the model, on "
               f"{block['sample']}; the numbers are in report.json):"]
          + [f"- {fired['message']}" for fired in block["fired"]])


def plot_curve(report: dict, path: str):
  curve = report["robustness_curve"]
  fig, ax = plt.subplots(figsize=(5, 3.5))
  ax.plot(curve["epsilon"], curve["accuracy"], marker="o")
  ax.axvline(report["epsilon"], color="grey", linestyle="--", label="training epsilon")
  ax.set_xlabel(f"epsilon ({report['norm']})")
  ax.set_ylabel(f"accuracy under {curve['attack']}")
  ax.set_ylim(0, 1)
  ax.set_title(f"{report['method']} on {report['dataset']}")
  ax.legend()
  config_tools.save_figure(fig, path)


def write_report(workdir: str, report: dict):
  config_tools.atomic_write(os.path.join(workdir, REPORT), json.dumps(report, indent=2) + "\n")
  config_tools.atomic_write(os.path.join(workdir, "report.md"), to_markdown(report))
  if report.get("robustness_curve"):
    plot_curve(report, os.path.join(workdir, "robustness_curve.png"))
