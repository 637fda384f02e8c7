"""The committed results (clead_jax/results/): every run they hold has its attacks in the order
they must be in. A stronger attack never leaves more accuracy than a weaker one of the same
family; if a file breaks this, the attack or the file is wrong, and RESULTS.md must not cite it."""

import glob
import json
import os

import pytest

from tests.conftest import REPO

RESULTS = os.path.join(REPO, "clead_jax", "results")
# Each AutoAttack version's stages in the order fra31/auto-attack's AutoAttack.set_version runs
# them (written out here, not taken from the code under test; test_autoattack.py checks that
# clead_jax.autoattack.versions builds the same lists).
STAGE_ORDER = {
    "autoattack": ["apgd_ce", "apgd_t", "fab_t", "square"],
    "autoattack_plus": ["apgd_ce", "apgd_dlr", "fab", "square", "apgd_t", "fab_t"],
    "autoattack_rand": ["apgd_ce", "apgd_dlr"],
}


def _runs():
  """(name, clean accuracy, robust accuracies) of every run in the committed results."""
  for path in sorted(glob.glob(os.path.join(RESULTS, "**", "*.json"), recursive=True)):
    with open(path) as f:
      data = json.load(f)
    name = os.path.relpath(path, RESULTS)
    if "rows" in data:  # a study: its runs
      for row in data["rows"]:
        for run in row["runs"]:
          yield (f"{name} {row['label']} seed {run['seed']}", run["clean_accuracy"],
                 run["robust_accuracy"])
    elif "robust_accuracy" in data:  # one run's report.json
      yield name, data["clean_accuracy"], data["robust_accuracy"]


RUNS = list(_runs())


def test_the_committed_results_are_found():
  assert len(RUNS) >= 12 + 30  # at least the 3-seed study and the 10-seed positives study


def _ordering_errors(clean, robust):
  errors = []
  chain = [("clean", clean)] + [(name, robust[name]) for name in ("pgd20", "pgd100", "autoattack")
                                if name in robust]
  for (weaker, a), (stronger, b) in zip(chain, chain[1:]):
    # PGD-100 starts where PGD-20 starts, walks its first 20 steps and keeps the first
    # misclassified iterate (attacks.EVAL_ATTACKS): it can never end above PGD-20.
    if b > a:
      errors.append(f"{stronger} {b:.4f} > {weaker} {a:.4f}")
  for attack, order in STAGE_ORDER.items():
    if attack not in robust:
      continue
    stages = [(stage, robust[f"{attack}/{stage}"]) for stage in order]
    for (before, a), (after, b) in zip(stages, stages[1:]):
      if b > a:
        errors.append(f"{attack}/{after} {b:.4f} > {attack}/{before} {a:.4f}")
    if stages[-1][1] != robust[attack]:
      errors.append(f"{attack} {robust[attack]:.4f} is not its last stage's {stages[-1][1]:.4f}")
  return errors


@pytest.mark.parametrize("name,clean,robust", RUNS, ids=[run[0] for run in RUNS])
def test_every_committed_run_orders_its_attacks(name, clean, robust):
  assert not _ordering_errors(clean, robust), name


def test_the_check_catches_a_pgd100_above_pgd20():
  """The earlier digits study had PGD-100 0.0083 above PGD-20 in two runs; that must fail."""
  robust = {"pgd20": 0.6611, "pgd100": 0.6694}
  assert _ordering_errors(0.98, robust) == ["pgd100 0.6694 > pgd20 0.6611"]
  robust["pgd100"] = 0.6611 + 1 / 1200  # one example of a 1,200-image split
  assert _ordering_errors(0.98, robust) == ["pgd100 0.6619 > pgd20 0.6611"]
  robust["pgd100"] = 0.6611
  assert not _ordering_errors(0.98, robust)
