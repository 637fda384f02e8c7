"""Two methods compared seed by seed, and image by image: python -m clead_jax.compare A B
(console script: clead-compare).

  python -m clead_jax.compare runs/study/clead runs/study/pgd_at
  python -m clead_jax.compare runs/study/clead runs/study/pgd_at --seeds 0,1 --subdir all_test

A and B are directories holding one run per seed, seed<k>/ (a study's method or sweep directory).
A seed gives both methods the same initialisation and batch order, so the comparison pairs them:
for clean accuracy, every attack both reports hold and the per-example worst case over their
shared white-box attacks, it prints A − B seed by seed, the mean ± standard error over the seeds
and in how many seeds A is ahead. Where both runs kept their per-example results
(report_examples.npz), it also counts, over the seeds, the test images only A gets right and those
only B gets right, with the exact McNemar test of "neither is better on these images": a small p
says the difference is more than the luck of which images were drawn, for these trained models;
the spread between seeds (the standard error) is what says how much a new training run varies.

--subdir reads the reports in seed<k>/SUBDIR instead (e.g. all_test, where `evaluate --report_dir
RUN/all_test` put an evaluation of every test image). Both reports of a seed must be of the same
points (dataset, split, number of examples, norm and epsilon); anything else is one line, exit 2.
Nothing is written.
"""

import json
import math
import os
import re

from absl import flags

from clead_jax import command_line
from clead_jax import report as report_lib
from clead_jax.errors import UserError
from clead_jax.study import tables

_POINTS = ("dataset", "split", "num_examples", "norm", "epsilon")  # what both runs must share
CLEAN = "clean"


def _define_flags():
  flags.DEFINE_string("seeds", "", "Comma-separated seeds to pair (default: every seed<k>/ both "
                      "directories hold with a report).")
  flags.DEFINE_string("subdir", "", "Read each seed's report from seed<k>/SUBDIR (e.g. all_test).")


def mcnemar_p(only_a, only_b):
  """Exact two-sided McNemar p-value: the chance, if each discordant image were equally likely to
  favour either method, of a split at least as uneven as only_a : only_b (exact integer
  arithmetic; 0.0 where it is below the smallest float)."""
  n = only_a + only_b
  if n == 0:
    return 1.0
  tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1))
  return min(1.0, 2 * tail / 2 ** n)


def _seeds_in(directory, subdir):
  seeds = set()
  for name in os.listdir(directory):
    match = re.fullmatch(r"seed(\d+)", name)
    if match and os.path.exists(os.path.join(directory, name, subdir, report_lib.REPORT)):
      seeds.add(int(match.group(1)))
  return seeds


def _read(directory, seed, subdir):
  path = os.path.join(directory, f"seed{seed}", subdir)
  report_path = os.path.join(path, report_lib.REPORT)
  if not os.path.exists(report_path):
    raise UserError(f"{report_path} does not exist: seed {seed} has no report there; evaluate "
                    "that run first or leave the seed out (--seeds)")
  try:
    with open(report_path) as f:
      report = json.load(f)
    points = {k: report["evaluation"][k] for k in _POINTS}
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise UserError(f"{report_path} cannot be read as a clead_jax report ({e!r}); evaluate the "
                    "run again to rewrite it") from None
  return report, points, report_lib.read_examples(path)


def _measures(reports):
  """clean, then the top-level attacks every report holds, in the study's order."""
  shared = set.intersection(*[set(r["robust_accuracy"]) for r in reports])
  shared = {a for a in shared if "/" not in a}
  order = [a for a in tables.ATTACK_ORDER if a in shared] + sorted(shared - set(tables.ATTACK_ORDER))
  return [CLEAN] + order


def compare(dir_a, dir_b, seeds=None, subdir=""):
  """The comparison as a dict: 'seeds', 'points', 'worst_case_attacks' and one entry per measure
  in 'rows': {'measure', 'transfer', 'paired' (tables.paired_difference's dict), 'only_a',
  'only_b', 'mcnemar_p'} (the last three None where a run lacks per-example results)."""
  for directory in (dir_a, dir_b):
    if not os.path.isdir(directory):
      raise UserError(f"{directory} is not a directory; give a method's directory holding "
                      "seed<k>/ runs (e.g. runs/STUDY/pgd_at)")
  if seeds is None:
    seeds = sorted(_seeds_in(dir_a, subdir) & _seeds_in(dir_b, subdir))
    if not seeds:
      raise UserError(f"{dir_a} and {dir_b} share no seed<k>/{subdir + '/' if subdir else ''}"
                      f"{report_lib.REPORT}; give the directories of two methods of one study")
  runs = {}
  for seed in seeds:
    (report_a, points_a, flags_a), (report_b, points_b, flags_b) = (
        _read(dir_a, seed, subdir), _read(dir_b, seed, subdir))
    if points_a != points_b:
      raise UserError(f"seed {seed}: the two reports are of other points ({points_a} against "
                      f"{points_b}); evaluate both on the same examples and threat model")
    runs[seed] = ((report_a, flags_a), (report_b, flags_b))
  all_reports = [r for pair in runs.values() for r, _ in pair]
  measures = _measures(all_reports)
  worst_attacks = tables.shared_white_box(all_reports)
  transfer = set().union(*[r.get("transfer_attacks", {}) for r in all_reports])
  per_example = all(f is not None and f.keys() >= set(measures) for pair in runs.values()
                    for _, f in pair)

  def value(report, flags_, measure):
    if measure == tables.WORST_CASE:
      return (float(tables.worst_case_flags(flags_, worst_attacks).mean()) if per_example
              else min(report["robust_accuracy"][a] for a in worst_attacks))
    return report["clean_accuracy"] if measure == CLEAN else report["robust_accuracy"][measure]

  def as_row(k, measure):  # method k's runs as tables.paired_difference reads a study's row
    values = {seed: value(*pair[k], measure) for seed, pair in runs.items()}
    return {"runs": [{"seed": seed, "robust_accuracy": {measure: v}, "worst_case_accuracy": v}
                     for seed, v in values.items()]}

  def correct(flags_, measure):
    return (tables.worst_case_flags(flags_, worst_attacks) if measure == tables.WORST_CASE
            else flags_[measure])

  rows = []
  for measure in measures + ([tables.WORST_CASE] if worst_attacks else []):
    row = {"measure": measure, "transfer": measure in transfer,
           "paired": tables.paired_difference(as_row(0, measure), as_row(1, measure), measure),
           "only_a": None, "only_b": None, "mcnemar_p": None}
    if per_example:
      pairs = [(correct(fa, measure), correct(fb, measure)) for (_, fa), (_, fb) in runs.values()]
      only_a = sum(int((a & ~b).sum()) for a, b in pairs)
      only_b = sum(int((~a & b).sum()) for a, b in pairs)
      row.update(only_a=only_a, only_b=only_b, mcnemar_p=mcnemar_p(only_a, only_b))
    rows.append(row)
  first = runs[seeds[0]][0][0]
  return {"a": dir_a, "b": dir_b, "seeds": list(seeds), "subdir": subdir,
          "points": {k: first["evaluation"][k] for k in _POINTS},
          "worst_case_attacks": worst_attacks, "per_example": per_example, "rows": rows}


def to_markdown(result):
  points = result["points"]
  label = lambda row: (f"worst case ({', '.join(result['worst_case_attacks'])})"
                       if row["measure"] == tables.WORST_CASE
                       else row["measure"] + (" (transfer)" if row["transfer"] else ""))
  lines = [f"# {result['a']} − {result['b']}", "",
           f"Seeds {', '.join(map(str, result['seeds']))}; {points['num_examples']} "
           f"{points['dataset']} {points['split']} examples, {points['norm']} epsilon "
           f"{points['epsilon']:g}; percentage points.", "",
           "| measure | per seed | mean ± s.e. | A ahead | images only A / only B | McNemar p |",
           "|---|---|---|---|---|---|"]
  for row in result["rows"]:
    paired = row["paired"]
    error = ("" if paired["standard_error"] is None
             else f" ± {100 * paired['standard_error']:.1f}")
    images = ("—" if row["only_a"] is None else f"{row['only_a']} / {row['only_b']}")
    p_value = ("—" if row["mcnemar_p"] is None else "< 1e-300" if row["mcnemar_p"] == 0
               else f"{row['mcnemar_p']:.2g}")  # 0.0: below the smallest float
    lines.append(f"| {label(row)} | {', '.join(f'{100 * d:+.1f}' for d in paired['differences'])}"
                 f" | {100 * paired['mean']:+.1f}{error} | {paired['ahead']}/"
                 f"{len(paired['seeds'])} | {images} | {p_value} |")
  if not result["per_example"]:
    lines += ["", "A run lacks its per-example results (report_examples.npz): no image counts."]
  return "\n".join(lines) + "\n"


def main(argv):
  command_line.start(argv, positional=2)
  with command_line.user_errors_as_one_line():
    if len(argv) < 3:
      raise UserError("name two methods' directories: python -m clead_jax.compare A B "
                      "[--seeds 0,1] [--subdir all_test]")
    text = flags.FLAGS.seeds.strip()
    try:
      seeds = [int(s) for s in text.split(",")] if text else None
    except ValueError:
      raise UserError(f"--seeds={text}: give comma-separated integers, e.g. --seeds 0,1") from None
    print(to_markdown(compare(argv[1], argv[2], seeds, flags.FLAGS.subdir)), end="", flush=True)


def run():
  command_line.run(main, _define_flags, __doc__, config_fields=False)


if __name__ == "__main__":
  run()
