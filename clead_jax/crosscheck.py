"""Our AutoAttack against the reference one, on the same model and the same points.

  python -m clead_jax.crosscheck --workdir runs/digits [--num_examples N]

(console script: clead-crosscheck). Reads DIR's report (its checkpoint, epsilon, norm and the
per-example AutoAttack flags in report_examples.npz; run `evaluate --attacks=autoattack` first),
exports the weights that report measured (its checkpoint, last or best, or the PyTorch file it
imported; their fingerprint must still be the report's) to PyTorch (clead_jax/torch_weights.py), runs the reference AutoAttack
(fra31/auto-attack as RobustBench installs it: the `pyautoattack` package; pip install
pyautoattack) in its standard version on the first N of the report's test points, and writes
DIR/crosscheck.json and crosscheck.md: clean and robust accuracy after each stage, ours and the
reference's, and the points each one broke that the other did not. When ours leaves more than one
example more robust than the reference, report.json and report.md get a warning.

The reference draws its random numbers per batch (its seed is fixed here), ours per example; the
two agree only in distribution, so a difference of an example or two either way is expected.
"""

import json
import logging
import os
import re
import time

import numpy as np
from absl import flags

from clead_jax import command_line
from clead_jax.errors import UserError

# The reference's stage names (pyautoattack) -> ours (report keys autoattack/<name>).
STAGES = {"apgd-ce": "apgd_ce", "apgd-t": "apgd_t", "fab-t": "fab_t", "square": "square",
          "apgd-dlr": "apgd_dlr", "fab": "fab"}
_REFERENCE_NAMES = {ours: reference for reference, ours in STAGES.items()}
_STAGE_LINE = re.compile(r"robust accuracy after ([A-Z-]+): ([0-9.]+)% \(total time ([0-9.]+) s\)")


class _StageLog(logging.Handler):
  """Collects the reference's 'robust accuracy after STAGE: P%' lines."""

  def __init__(self):
    super().__init__(logging.DEBUG)
    self.after = {}
    self.total_time = {}  # seconds since the attacks started, at the end of each stage
    self.warnings = []  # the reference's own checks (its checks.py) that fired

  def emit(self, record):
    if record.levelno >= logging.WARNING:
      self.warnings.append(record.getMessage())
    match = _STAGE_LINE.search(record.getMessage())
    if match:
      self.after[match.group(1).lower()] = float(match.group(2)) / 100.0
      self.total_time[match.group(1).lower()] = float(match.group(3))

  def check(self, stages, clean_accuracy, robust_accuracy):
    """Fills in the stages the reference skipped once nothing was robust (it logs no line for
    them); raises if any other stage's line is missing, or if the last line disagrees with the
    reference's own per-example result: its log format changed and the table would be wrong."""
    before = clean_accuracy
    for stage in stages:
      if stage not in self.after:
        if before == 0.0:
          self.after[stage] = 0.0
          continue
        raise RuntimeError(
            f"crosscheck: the reference's log has no line 'robust accuracy after "
            f"{stage.upper()}: ...%' although {before:.2%} of the points were still robust before "
            f"it; the per-stage table cannot be made (has pyautoattack's log format changed? "
            f"the lines parsed: {sorted(self.after) or 'none'})")
      before = self.after[stage]
    if stages and abs(before - robust_accuracy) > 6e-5:  # the line rounds to 0.01%
      raise RuntimeError(
          f"crosscheck: the reference's log says {before:.2%} after {stages[-1].upper()}, its "
          f"per-example result {robust_accuracy:.2%}; the stage lines were misread")

  def stage_times(self):
    times, before = {}, 0.0
    for stage, total in self.total_time.items():
      times[stage], before = total - before, total
    return times


def reference_autoattack(torch_model, images, labels, *, epsilon, norm, version="standard",
                         attacks=None, batch_size=250, seed=0, device="cpu", stage_times=None,
                         apgd_restarts=None, warnings=None):
  """(robust per example, {stage: accuracy after it}, seconds) of the reference AutoAttack;
  `stage_times`, a dict, receives each stage's seconds, and `warnings`, a list, the warnings of
  the reference's own checks (e.g. Square lowering the accuracy after the white-box attacks).

  images: NHWC in [0, 1] (numpy); the model takes NCHW. attacks: the reference's names, with
  version 'custom' (e.g. ['apgd-ce'] or ['square'] alone). apgd_restarts: APGD-CE's restarts
  (the reference's 'custom' version keeps its constructor's 5; 'standard' sets 1)."""
  try:
    from pyautoattack import AutoAttack  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise UserError("the reference AutoAttack is not installed: pip install torch pyautoattack "
                    "(or pip install -e '.[torch]')") from None
  x = torch.as_tensor(np.asarray(images, np.float32)).permute(0, 3, 1, 2).contiguous().to(device)
  y = torch.as_tensor(np.asarray(labels, np.int64)).to(device)
  torch_model = torch_model.to(device)
  logger = logging.getLogger("auto-attack")
  handler, level = _StageLog(), logger.level
  logger.addHandler(handler)
  logger.setLevel(logging.DEBUG)
  logger.propagate = False  # its lines go to crosscheck.json, not the terminal
  start = time.time()
  try:
    attack = AutoAttack(torch_model, norm={"linf": "Linf", "l2": "L2"}[norm], eps=float(epsilon),
                        version=version, attacks=attacks, seed=seed, device=device)
    if apgd_restarts is not None:
      attack.apgd.n_restarts = apgd_restarts
    with torch.no_grad():
      clean = torch_model(x).argmax(1) == y
    _, y_adv = attack.run_standard_evaluation(x, y, batch_size=batch_size)
  finally:
    logger.removeHandler(handler)
    logger.setLevel(level)
  robust = (y_adv == y).cpu().numpy() & clean.cpu().numpy()
  handler.check(list(attack.attacks_to_run), float(clean.float().mean()), float(robust.mean()))
  if stage_times is not None:
    stage_times.update(handler.stage_times())
  if warnings is not None:
    warnings.extend(handler.warnings)
  return robust, handler.after, time.time() - start


def compare(ours_clean, ours_stages, reference_clean, reference_robust, reference_after):
  """The crosscheck summary: accuracies per stage and the points only one side broke."""
  n = len(ours_clean)
  ours_final = list(ours_stages.values())[-1]
  stages = {}
  for name, flags_after in ours_stages.items():
    stages[name] = {"ours": float(np.mean(flags_after)),
                    "reference": reference_after.get(_REFERENCE_NAMES.get(name, name))}
  only_ours = np.flatnonzero(~ours_final & reference_robust)
  only_reference = np.flatnonzero(ours_final & ~reference_robust)
  ours_count, reference_count = int(ours_final.sum()), int(reference_robust.sum())
  warnings = []
  if ours_count > reference_count + 1:
    warnings.append(
        f"crosscheck: our AutoAttack leaves {ours_count} of {n} points robust, the reference "
        f"{reference_count}: ours is weaker here by more than one example; trust the reference's "
        "number (crosscheck.md lists the points)")
  return {"num_examples": n,
          "clean_accuracy": {"ours": float(np.mean(ours_clean)),
                             "reference": float(np.mean(reference_clean))},
          "robust_accuracy": {"ours": ours_count / n, "reference": reference_count / n},
          "stages": stages,
          "broken_only_by_ours": only_ours.tolist(),
          "broken_only_by_reference": only_reference.tolist(),
          "warnings": warnings}


def add_times(result, ours_times, reference_times, reference_total):
  """Seconds per stage and in all, ours (the report's attack_time_s: ours ran on all of the
  report's points, with compilation) and the reference's (on the cross-checked points)."""
  for name, values in result["stages"].items():
    values["ours_time_s"] = ours_times.get(f"autoattack/{name}")
    values["reference_time_s"] = reference_times.get(_REFERENCE_NAMES.get(name, name))
  result["time_s"] = {"ours": ours_times.get("autoattack"), "reference": reference_total}
  return result


def _cell(value, form):
  return "—" if value is None else format(value, form)


def to_markdown(result):
  times = result.get("time_s", {})
  lines = ["# AutoAttack cross-check: ours against the reference (pyautoattack)", "",
           f"{result['num_examples']} test points, the report's checkpoint (step "
           f"{result['step']}, weights fingerprint {result.get('weights_fingerprint', '?')}), "
           f"{result['norm']} epsilon = {result['epsilon']:g}. Times: ours "
           f"from the report (its {result.get('report_examples', result['num_examples'])} points, "
           "compilation included), the reference's on these points, on this machine.", "",
           "| | ours | reference | ours (s) | reference (s) |", "|---|---|---|---|---|",
           f"| clean | {result['clean_accuracy']['ours']:.4f} | "
           f"{result['clean_accuracy']['reference']:.4f} | | |"]
  for name, values in result["stages"].items():
    lines.append(f"| after {name} | {values['ours']:.4f} | {_cell(values['reference'], '.4f')} | "
                 f"{_cell(values.get('ours_time_s'), '.1f')} | "
                 f"{_cell(values.get('reference_time_s'), '.1f')} |")
  lines.append(f"| AutoAttack (robust) | {result['robust_accuracy']['ours']:.4f} | "
               f"{result['robust_accuracy']['reference']:.4f} | "
               f"{_cell(times.get('ours'), '.1f')} | {_cell(times.get('reference'), '.1f')} |")
  lines += ["", f"Broken only by ours: {result['broken_only_by_ours'] or 'none'}.",
            f"Broken only by the reference: {result['broken_only_by_reference'] or 'none'}."]
  lines += [f"\n**Warning:** {w}" for w in result["warnings"]]
  lines += [f"\nThe reference's own check: {w}" for w in result.get("reference_warnings", [])]
  return "\n".join(lines) + "\n"


def crosscheck_workdir(workdir, num_examples=None, batch_size=250):
  """Runs the cross-check of DIR's AutoAttack; writes crosscheck.* and returns the result."""
  # pylint: disable=g-import-not-at-top
  import jax
  from clead_jax import torch_weights
  from clead_jax import input_pipeline
  from clead_jax import parallel
  from clead_jax import report as report_lib
  from clead_jax.evaluation import workdir as workdir_lib
  report_path = os.path.join(workdir, report_lib.REPORT)
  examples_path = os.path.join(workdir, report_lib.EXAMPLES)
  if not os.path.exists(report_path) or not os.path.exists(examples_path):
    raise UserError(f"--workdir {workdir} has no report with per-example results; run "
                    f"python -m clead_jax.evaluate --workdir {workdir} --attacks=autoattack first")
  with open(report_path) as f:
    report = json.load(f)
  with np.load(examples_path) as saved:
    stored = {k.replace("__", "/"): saved[k].astype(bool) for k in saved.files}
  if "autoattack" not in stored:
    raise UserError(f"the report in {workdir} has no AutoAttack result; run python -m "
                    f"clead_jax.evaluate --workdir {workdir} --attacks=autoattack first")
  n = len(stored["clean"])
  if num_examples is not None:
    if not 1 <= num_examples <= n:
      raise UserError(f"--num_examples={num_examples} must be between 1 and the report's {n} "
                      "examples")
    n = num_examples
  config = workdir_lib.load_config(workdir)
  dataset = input_pipeline.load_dataset(config.data)
  network, variables, mean, std = workdir_lib.restore_evaluated(workdir, report, config, dataset,
                                                                parallel.make_mesh())
  del network  # the PyTorch twin below is built from the same architecture and weights
  step = report["evaluation"]["checkpoint_step"]
  arch = torch_weights.architecture(config.model, dataset.image_shape, dataset.num_classes)
  state_dict, _ = torch_weights.to_torch(config.model, jax.device_get(variables))
  torch_model = torch_weights.torch_module(arch, mean, std, state_dict)
  images, labels = dataset.test_images[:n], dataset.test_labels[:n]
  reference_times, reference_warnings = {}, []
  robust, after, seconds = reference_autoattack(
      torch_model, input_pipeline.to_float(images), labels, epsilon=report["epsilon"],
      norm=report["norm"], batch_size=batch_size, stage_times=reference_times,
      warnings=reference_warnings)
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    x = torch.as_tensor(np.asarray(input_pipeline.to_float(images), np.float32)).permute(0, 3, 1, 2)
    reference_clean = (torch_model(x).argmax(1).numpy() == labels)
  ours_stages = {k.split("/", 1)[1]: v[:n] for k, v in stored.items()
                 if k.startswith("autoattack/")}
  result = compare(stored["clean"][:n], ours_stages, reference_clean, robust, after)
  add_times(result, report.get("attack_time_s", {}), reference_times, seconds)
  result.update(step=int(step), epsilon=report["epsilon"], norm=report["norm"],
                checkpoint_source=report["evaluation"]["checkpoint_source"],
                weights_fingerprint=report["evaluation"]["weights_fingerprint"],
                config_fingerprint=report["evaluation"]["config_fingerprint"],
                report_examples=len(stored["clean"]), reference_warnings=reference_warnings,
                reference="pyautoattack, version standard, seed 0, "
                f"batch size {batch_size}, {torch.get_num_threads()} PyTorch threads")
  if jax.process_index() == 0:
    from clead_jax import config_tools  # pylint: disable=g-import-not-at-top
    config_tools.atomic_write(os.path.join(workdir, "crosscheck.json"),
                              json.dumps(result, indent=2) + "\n")
    config_tools.atomic_write(os.path.join(workdir, "crosscheck.md"), to_markdown(result))
    kept = [w for w in report.get("warnings", []) if not w.startswith("crosscheck:")]
    report["warnings"] = kept + result["warnings"]
    report_lib.write_report(workdir, report)
  return result


def _define_flags():
  flags.DEFINE_string("workdir", None, "Workdir whose report holds an AutoAttack result.")
  flags.DEFINE_integer("num_examples", None, "The first N of the report's examples (default all).")
  flags.DEFINE_integer("batch_size", 250, "The reference's batch size (its results depend on it).")


def main(argv):
  command_line.start(argv)
  command_line.require("workdir")
  values = flags.FLAGS
  command_line.log_to(values.workdir)
  with command_line.user_errors_as_one_line():
    # pylint: disable=g-import-not-at-top
    from clead_jax import torch_weights
    from clead_jax import workdir_lock
    # Before any work: PyTorch and the reference, and a workdir this process alone writes.
    torch_weights.import_torch()
    try:
      import pyautoattack  # pylint: disable=unused-import
    except ImportError:
      raise UserError("the reference AutoAttack is not installed: pip install pyautoattack "
                      "(or pip install -e '.[torch]')") from None
    workdir_lock.check_writable(values.workdir, "--workdir")
    workdir_lock.acquire(values.workdir)
    result = crosscheck_workdir(values.workdir, values.num_examples, values.batch_size)
    print(to_markdown(result), flush=True)


def run():
  command_line.run(main, _define_flags, __doc__)


if __name__ == "__main__":
  run()
