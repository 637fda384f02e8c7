"""The run's report: report.json (the contract later tools read), report.md, robustness_curve.png.

Files are written to a temporary name and renamed, so a crash never leaves a half-written report.
"""

import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position


def _atomic_write(path, text):
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def to_markdown(report: dict) -> str:
  eps = report["epsilon"]
  lines = [
      f"# Robustness report: {report['method']} on {report['dataset']} ({report['model']})",
      "",
      f"Threat model: {report['norm']}, epsilon = {eps:.6g}. "
      f"{report['num_examples']} test examples; {report['steps']} training steps.",
      "",
      "| attack | accuracy |",
      "|---|---|",
      f"| clean | {report['clean_accuracy']:.4f} |",
  ]
  lines += [f"| {name} | {acc:.4f} |" for name, acc in report["robust_accuracy"].items()]
  if "worst_case_accuracy" in report:
    lines.append(f"| worst case per example (every attack above) | "
                 f"{report['worst_case_accuracy']:.4f} |")
  times = report.get("attack_time_s")
  if times:
    lines += ["", "Attack times (s, compilation included): "
              + ", ".join(f"{name} {seconds:.1f}" for name, seconds in times.items())]
  curve = report.get("robustness_curve")
  if curve:
    lines += ["", f"Robustness curve ({curve['attack']}): "
              + ", ".join(f"{e:.4g}: {a:.3f}" for e, a in zip(curve["epsilon"], curve["accuracy"]))]
  for warning in report.get("warnings", []):
    lines += ["", f"WARNING: {warning}"]
  lines += ["", f"Train time {report['train_time_s']:.1f} s, evaluation time "
            f"{report['eval_time_s']:.1f} s.", ""]
  return "\n".join(lines)


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
  fig.tight_layout()
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=120)
  plt.close(fig)
  os.replace(tmp, path)


def write_report(workdir: str, report: dict):
  _atomic_write(os.path.join(workdir, "report.json"), json.dumps(report, indent=2) + "\n")
  _atomic_write(os.path.join(workdir, "report.md"), to_markdown(report))
  if report.get("robustness_curve"):
    plot_curve(report, os.path.join(workdir, "robustness_curve.png"))
