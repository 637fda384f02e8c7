"""python -m clead_jax.compare: two methods of a study, paired by seed and by image, on the
committed Fashion-MNIST full-split study (real reports and their per-example results)."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from clead_jax import compare
from clead_jax.study import tables
from tests import processes
from tests.conftest import REPO

STUDY = os.path.join(REPO, "clead_jax", "results", "fashion_mnist_full_study")
PAIR, PGD_AT = os.path.join(STUDY, "clead"), os.path.join(STUDY, "pgd_at")


def _report(directory, seed, subdir=""):
  with open(os.path.join(directory, f"seed{seed}", subdir, "report.json")) as f:
    return json.load(f)


def test_mcnemar_p_is_the_exact_binomial_tail_by_hand():
  # 10 : 2 discordant images: 2 * (C(12,0) + C(12,1) + C(12,2)) / 2^12 = 2 * 79 / 4096.
  assert compare.mcnemar_p(10, 2) == pytest.approx(158 / 4096)
  assert compare.mcnemar_p(2, 10) == compare.mcnemar_p(10, 2)
  assert compare.mcnemar_p(5, 5) == 1.0 and compare.mcnemar_p(0, 0) == 1.0
  assert compare.mcnemar_p(7, 0) == pytest.approx(2 / 128)


@pytest.mark.parametrize("subdir", ["", "all_test"])
def test_paired_by_seed_and_by_image_agree_with_the_reports(subdir):
  result = compare.compare(PAIR, PGD_AT, [0, 1], subdir)
  reports = {s: (_report(PAIR, s, subdir), _report(PGD_AT, s, subdir)) for s in (0, 1)}
  n = reports[0][0]["num_examples"]
  assert result["per_example"] and n == (1000 if not subdir else 10000)
  rows = {row["measure"]: row for row in result["rows"]}
  for measure, row in rows.items():
    if measure == compare.CLEAN:
      per_seed = [a["clean_accuracy"] - b["clean_accuracy"] for a, b in reports.values()]
    elif measure == tables.WORST_CASE:  # from the flags here, from the evaluation in the report
      per_seed = [a["worst_case_accuracy"] - b["worst_case_accuracy"] for a, b in reports.values()]
    else:
      per_seed = [a["robust_accuracy"][measure] - b["robust_accuracy"][measure]
                  for a, b in reports.values()]
    assert row["paired"]["differences"] == pytest.approx(per_seed, abs=1e-9), measure
    # Images only A holds minus those only B holds is the difference of the correct counts.
    assert row["only_a"] - row["only_b"] == round(n * sum(per_seed)), measure
    assert 0 < row["mcnemar_p"] <= 1
  assert "transfer_pgd3" not in result["worst_case_attacks"]
  assert rows.get("transfer_pgd3", {"transfer": True})["transfer"]


def test_the_command_prints_the_table_and_bad_input_is_one_line(tmp_path):
  command = [sys.executable, "-m", "clead_jax.compare"]
  ok = processes.run(command + [PAIR, PGD_AT, "--seeds", "0,1"], timeout=300)
  assert ok.returncode == 0, ok.stderr[-2000:]
  autoattack = next(l for l in ok.stdout.splitlines() if l.startswith("| autoattack |"))
  per_seed = [100 * (_report(PAIR, s)["robust_accuracy"]["autoattack"]
                     - _report(PGD_AT, s)["robust_accuracy"]["autoattack"]) for s in (0, 1)]
  assert autoattack.startswith(f"| autoattack | {per_seed[0]:+.1f}, {per_seed[1]:+.1f} |")

  # seed 0 of B evaluated on other points: one line naming the seed, exit 2.
  other = tmp_path / "pgd_at"
  shutil.copytree(os.path.join(PGD_AT, "seed0"), other / "seed0")
  report = json.loads((other / "seed0" / "report.json").read_text())
  report["evaluation"]["num_examples"] = 500
  (other / "seed0" / "report.json").write_text(json.dumps(report))
  for argv, expected in [
      ([PAIR, str(other)], "error: seed 0: the two reports are of other points"),
      ([PAIR, PGD_AT, "--seeds", "7"], f"error: {PAIR}/seed7/report.json does not exist"),
      ([PAIR, PGD_AT, "--seeds", "0,x"], "error: --seeds=0,x: give comma-separated integers"),
      ([PAIR], "error: name two methods' directories")]:
    bad = processes.run(command + argv, timeout=300)
    lines = processes.messages(bad.stderr)
    assert bad.returncode == 2 and len(lines) == 1 and lines[0].startswith(expected), bad.stderr


def test_without_per_example_results_the_seed_pairs_remain(tmp_path):
  for method, directory in (("a", PAIR), ("b", PGD_AT)):
    for seed in (0, 1):
      shutil.copytree(os.path.join(directory, f"seed{seed}"), tmp_path / method / f"seed{seed}")
  os.remove(tmp_path / "a" / "seed1" / "report_examples.npz")
  result = compare.compare(str(tmp_path / "a"), str(tmp_path / "b"))
  assert result["seeds"] == [0, 1] and not result["per_example"]
  assert all(row["only_a"] is None for row in result["rows"])
  with_flags = compare.compare(PAIR, PGD_AT, [0, 1])
  # Without flags the worst case is each run's lowest attack; here AutoAttack, as with them.
  for row, flagged in zip(result["rows"], with_flags["rows"], strict=True):
    assert row["paired"]["differences"] == pytest.approx(flagged["paired"]["differences"],
                                                         abs=1e-9), row["measure"]
  assert "no image counts" in compare.to_markdown(result)
  assert np.isfinite([r["paired"]["mean"] for r in result["rows"]]).all()


def test_a_p_value_below_the_smallest_float_is_printed_as_such():
  # PGD-AT seed 2 never trained: over the 10,000 images McNemar's p underflows.
  result = compare.compare(PAIR, PGD_AT, [0, 1, 2], "all_test")
  row = next(r for r in result["rows"] if r["measure"] == "pgd20")
  assert row["mcnemar_p"] == 0.0 and row["only_a"] > 5 * row["only_b"]
  line = next(l for l in compare.to_markdown(result).splitlines() if l.startswith("| pgd20 |"))
  assert line.endswith(f"| {row['only_a']} / {row['only_b']} | < 1e-300 |"), line
