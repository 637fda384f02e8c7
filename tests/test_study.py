"""The study command: runs every method x seed, writes the table, JSON and plots, resumes without
repeating finished runs; sweeps, statistics and failures on fake runs."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from clead_jax import config_checks
from clead_jax import config_tools
from clead_jax import provenance
from clead_jax.study import runs as study
from clead_jax.errors import UserError
from tests.conftest import REPO

# A few steps of a small model on 40 test images, as config fields and as command-line flags.
TINY = {"model.width": 8, "model.projection_dim": 16, "train.epochs": 1, "attack.steps": 2,
        "eval.num_examples": 40, "eval.batch_size": 40, "eval.curve_points": 3,
        "eval.attacks": "pgd20"}
TINY_FLAGS = [f"--config.{field}={value}" for field, value in TINY.items()]
SUMMARY_KEYS = {"dataset", "model", "norm", "epsilon", "eval_attacks", "num_examples", "seeds",
                "sweeps", "note", "command", "wall_time_s", "rows"}
ROW_KEYS = {"label", "method", "settings", "path", "seeds_finished", "seeds_failed",
            "clean_accuracy", "robust_accuracy", "worst_case_accuracy", "worst_case_per_example",
            "robustness_curve", "runs"}


def _config(**overrides):
  """configs/digits.py with the TINY fields and `overrides`, as the command line makes it."""
  config = config_tools.load_config_file(os.path.join(REPO, "configs", "digits.py"))
  config_tools.set_fields(config, {**TINY, **overrides})
  config.lock()
  return config


def _table_rows(markdown):
  """The first table of study.md: its rows by their first cell."""
  table = markdown.split("| method", 1)[1].split("\n\n", 1)[0]
  return {line.split("|")[1].strip(): line for line in table.splitlines()[2:]}


def test_study_command_runs_writes_and_resumes(tmp_path):
  workdir = tmp_path / "study"
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  result = subprocess.run(
      [sys.executable, "-m", "clead_jax.study", "--config", "configs/digits.py",
       "--methods", "standard,pgd_at", "--seeds", "1", "--workdir", str(workdir), *TINY_FLAGS],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "[2/2] pgd_at seed 0: done" in result.stdout

  summary = json.loads((workdir / "study.json").read_text())
  assert SUMMARY_KEYS <= set(summary) and summary["seeds"] == [0]
  assert [row["label"] for row in summary["rows"]] == ["standard", "pgd_at"]
  for row in summary["rows"]:
    assert ROW_KEYS <= set(row) and row["seeds_finished"] == [0]
    report = json.loads((workdir / row["method"] / "seed0" / "report.json").read_text())
    assert row["clean_accuracy"]["mean"] == report["clean_accuracy"]
    assert row["robust_accuracy"]["pgd20"]["mean"] == report["robust_accuracy"]["pgd20"]
    assert row["worst_case_accuracy"]["mean"] == report["worst_case_accuracy"]
    assert row["worst_case_per_example"]
    assert len(row["robustness_curve"]["mean"]) == 3
  rows = _table_rows((workdir / "study.md").read_text())
  assert set(rows) == {"standard", "pgd_at"}
  pgd_at_pgd20 = 100 * summary["rows"][1]["robust_accuracy"]["pgd20"]["mean"]
  assert f"| {pgd_at_pgd20:.1f} |" in rows["pgd_at"]
  assert "| +0.0 |" in rows["pgd_at"]  # the Δ column: PGD-AT against itself
  assert "the worst case is the fraction of points that every attack" in (
      (workdir / "study.md").read_text())
  for plot in ["study_robust_vs_clean.png", "study_curves.png"]:
    assert (workdir / plot).stat().st_size > 1000

  # Resume: with every report.json present nothing trains, and the summary is the same.
  mtimes = {p: p.stat().st_mtime_ns for p in workdir.glob("*/seed0/report.json")}

  def must_not_train(config, run_dir):
    raise AssertionError(f"trained {config.method} again in {run_dir}")

  again = study.run_study(_config(), str(workdir), ["standard", "pgd_at"], 1,
                          train_fn=must_not_train)
  assert [r["clean_accuracy"] for r in again["rows"]] == [r["clean_accuracy"]
                                                          for r in summary["rows"]]
  assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes

  # Only the run without a report.json trains again.
  os.remove(workdir / "standard" / "seed0" / "report.json")
  trained = []

  def fake_train(config, run_dir):
    trained.append(run_dir)
    return _fake_report(config, run_dir, clean=0.5, robust={"pgd20": 0.25})

  study.run_study(_config(), str(workdir), ["standard", "pgd_at"], 1, train_fn=fake_train)
  assert trained == [str(workdir / "standard" / "seed0")]


FAKE_WEIGHTS = "fake-weights"


def fake_final_weights(directory, config):
  """What study.run_study reads of a fake run's checkpoint: its fingerprint and step."""
  del directory, config
  return FAKE_WEIGHTS, 1


def _fake_report(config, run_dir, clean, robust, curve=None, checked=True):
  """A report as a run's final evaluation writes it (its identity that of step 1 of 1 with the
  weights fake_final_weights names), without per-example flags; `checked=False`: as one stopped
  after its last attack, before its final checks."""
  os.makedirs(run_dir, exist_ok=True)
  report = {"method": config.method, "dataset": "digits", "model": "small_cnn", "norm": "linf",
            "epsilon": 0.2, "num_examples": 40, "clean_accuracy": clean,
            "robust_accuracy": robust, "steps": 1, "total_steps": 1, "test_split_size": 360,
            "train_time_s": 1.0, "eval_time_s": 1.0,
            "evaluation": {"weights_fingerprint": FAKE_WEIGHTS,
                           "config_fingerprint": provenance.config_fingerprint(config),
                           "checkpoint_step": 1, "checkpoint_source": "checkpoints",
                           "num_examples": 40, "epsilon": float(config.attack.epsilon),
                           "norm": config.attack.norm}}
  if checked:
    report["warnings"] = []
  if curve is not None:
    report["robustness_curve"] = {"attack": "pgd20", "epsilon": [0.0, 0.2, 0.4], "accuracy": curve}
  with open(os.path.join(run_dir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(sort_keys=True, indent=2))
  with open(os.path.join(run_dir, "report.json"), "w") as f:
    json.dump(report, f)
  return report


def test_statistics_table_and_plots_from_fake_runs(tmp_path):
  """Three seeds of two methods with AutoAttack keys: means and sample stds against numpy, the
  AutoAttack column, the worst case over top-level attacks only, and the Δ to PGD-AT."""
  rng = np.random.default_rng(0)
  made = {}

  def fake_train(config, run_dir):
    values = rng.uniform(0.1, 0.9, size=5)
    made[(config.method, config.seed)] = values
    robust = {"pgd20": values[1], "autoattack": values[2], "autoattack/apgd_ce": 0.0,
              "fgsm": values[3]}
    return _fake_report(config, run_dir, values[0], robust, curve=[values[0], values[4], 0.0])

  summary = study.run_study(_config(), str(tmp_path), ["pgd_at", "clead"], 3,
                            train_fn=fake_train)
  assert summary["seeds"] == [0, 1, 2]
  for row in summary["rows"]:
    values = np.array([made[(row["method"], s)] for s in range(3)])
    assert np.isclose(row["clean_accuracy"]["mean"], values[:, 0].mean())
    assert np.isclose(row["clean_accuracy"]["std"], values[:, 0].std(ddof=1))
    assert np.isclose(row["robust_accuracy"]["autoattack"]["mean"], values[:, 2].mean())
    # autoattack/apgd_ce (0.0) is a stage of AutoAttack, not an attack of the suite.
    assert np.isclose(row["worst_case_accuracy"]["mean"], values[:, 1:4].min(axis=1).mean())
    assert not row["worst_case_per_example"]  # these reports have no worst_case_accuracy
    assert np.allclose(row["robustness_curve"]["mean"], [values[:, 0].mean(),
                                                         values[:, 4].mean(), 0.0])
  rows = _table_rows((tmp_path / "study.md").read_text())
  clead_aa = np.array([made[("clead", s)][2] for s in range(3)])
  pgd_at_aa = np.array([made[("pgd_at", s)][2] for s in range(3)])
  assert f"| {100 * clead_aa.mean():.1f} ± {100 * clead_aa.std(ddof=1):.1f} |" in rows["clead"]
  assert f"| {100 * (clead_aa.mean() - pgd_at_aa.mean()):+.1f} |" in rows["clead"]
  differences = clead_aa - pgd_at_aa
  paired = (f"| {100 * differences.mean():+.1f} ± {100 * differences.std(ddof=1) / np.sqrt(3):.1f} "
            f"(ahead in {int(np.sum(differences > 0))}/3) |")
  assert paired in rows["clead"], rows["clead"]
  assert rows["pgd_at"].rstrip().endswith("| — |")  # no paired Δ of the reference to itself
  assert "Δ AutoAttack vs pgd_at" in (tmp_path / "study.md").read_text()
  assert "the worst case is the lowest accuracy of each run" in (tmp_path / "study.md").read_text()
  # The per-seed worst-case Δ, in the every-attack table.
  worst = {m: np.array([made[(m, s)][1:4].min() for s in range(3)]) for m in ("clead", "pgd_at")}
  differences = worst["clead"] - worst["pgd_at"]
  every_attack = (tmp_path / "study.md").read_text().split("Every attack", 1)[1]
  clead_line = next(line for line in every_attack.splitlines() if line.startswith("| clead"))
  assert clead_line.endswith(
      f"| {100 * differences.mean():+.1f} ± {100 * differences.std(ddof=1) / np.sqrt(3):.1f} "
      f"(ahead in {int(np.sum(differences > 0))}/3) |"), clead_line
  for plot in ["study_robust_vs_clean.png", "study_curves.png"]:
    assert (tmp_path / plot).stat().st_size > 1000


def test_worst_case_is_the_lowest_accuracy_for_every_run_unless_all_have_flags(tmp_path):
  """One run with per-example flags and one without: both get the lowest accuracy over the
  shared attacks (never per example for one and lowest for the other), and the caption says so."""
  def fake_train(config, run_dir):
    report = _fake_report(config, run_dir, clean=0.9, robust={"pgd20": 0.5, "fgsm": 0.6})
    if config.method == "pgd_at":  # its flags would give 0.45 per example
      robust = np.arange(40) < 18
      np.savez(os.path.join(run_dir, "report_examples.npz"), clean=np.ones(40, bool),
               pgd20=robust, fgsm=robust)
    return report

  summary = study.run_study(_config(), str(tmp_path), ["pgd_at", "clead"], 1,
                            train_fn=fake_train)
  rows = {row["method"]: row for row in summary["rows"]}
  assert rows["pgd_at"]["worst_case_accuracy"]["mean"] == 0.5
  assert rows["clead"]["worst_case_accuracy"]["mean"] == 0.5
  assert not summary["worst_case_per_example"] and not rows["pgd_at"]["worst_case_per_example"]
  assert ("the lowest accuracy of each run over fgsm, pgd20, the same attacks for every run (not "
          "every run has its per-example results)") in (tmp_path / "study.md").read_text()


def test_sweep_values_take_the_field_type():
  config = _config()
  assert study.parse_sweep("config.loss.lam=0,0.1,2", config) == ("loss.lam", [0.0, 0.1, 2.0])
  assert study.parse_sweep("train.pretrain_epochs=0,5", config) == ("train.pretrain_epochs", [0, 5])
  assert study.parse_sweep("config.loss.positives=pair,class", config)[1] == ["pair", "class"]
  assert study.parse_sweep("config.attack.random_start=true,0", config)[1] == [True, False]
  for bad, named in [("config.loss.lambda=1", "not a config field"),
                     ("config.train.epochs=1.5", "not a int"),
                     ("config.method=clead", "--methods"),
                     ("config.loss.lam", "expected config.field=v1,v2"),
                     ("config.loss.lam=1,1", "repeats")]:
    with pytest.raises(UserError, match=named):
      study.parse_sweep(bad, config)


def test_swept_value_equal_to_the_config_reuses_the_plain_run(tmp_path):
  config = _config()  # loss.lam = 1.0
  sweeps = [study.parse_sweep("config.loss.lam=0.5,1", config)]
  variants = study.make_variants(config, ["clead"], sweeps, baselines=["pgd_at"])
  assert [v.path for v in variants] == ["pgd_at", "clead/loss.lam=0.5", "clead"]
  assert [v.label for v in variants] == ["pgd_at", "clead loss.lam=0.5", "clead loss.lam=1.0"]
  assert study.run_config(config, variants[1], 7, str(tmp_path)).loss.lam == 0.5
  assert study.run_config(config, variants[1], 7, str(tmp_path)).seed == 7

  trained = []

  def fake_train(run_config, run_dir):
    trained.append(os.path.relpath(run_dir, tmp_path))
    return _fake_report(run_config, run_dir, 0.9, {"pgd20": 0.5})

  summary = study.run_study(config, str(tmp_path), ["clead"], 1, sweeps, ["pgd_at"],
                            train_fn=fake_train)
  assert trained == ["pgd_at/seed0", "clead/loss.lam=0.5/seed0", "clead/seed0"]
  assert (tmp_path / "study_loss.lam.md").exists() and not (tmp_path / "study.md").exists()
  assert summary["sweeps"] == {"loss.lam": [0.5, 1.0]}


def test_finished_run_with_another_config_is_an_error(tmp_path):
  fake = lambda config, run_dir: _fake_report(config, run_dir, 0.9, {"pgd20": 0.5})
  study.run_study(_config(), str(tmp_path), ["clead"], 1, train_fn=fake)
  # Neutral fields (logging, eval batch size) still count as the same run.
  def must_not_train(config, run_dir):
    raise AssertionError(f"trained {config.method} again in {run_dir}")

  study.run_study(_config(**{"eval.batch_size": 7, "train.log_every": 3,
                              "eval.indicators": False}), str(tmp_path),
                  ["clead"], 1, train_fn=must_not_train, final_weights=fake_final_weights)
  with pytest.raises(UserError, match="config.loss.temperature"):
    study.run_study(_config(**{"loss.temperature": 0.5}), str(tmp_path), ["clead"], 1,
                    train_fn=fake)


def test_a_report_stopped_before_its_final_checks_is_resumed(tmp_path):
  """Every attack is in the report but its warnings (and indicators) are not: the evaluation was
  stopped in its last phase, so the run is resumed, not counted as finished."""
  stopped = lambda config, run_dir: _fake_report(config, run_dir, 0.9, {"pgd20": 0.5},
                                                 checked=False)
  study.run_study(_config(), str(tmp_path), ["clead"], 1, train_fn=stopped)
  resumed = []

  def resume(config, run_dir):
    resumed.append(run_dir)
    return _fake_report(config, run_dir, 0.9, {"pgd20": 0.5})

  study.run_study(_config(), str(tmp_path), ["clead"], 1, train_fn=resume,
                  final_weights=fake_final_weights)
  assert len(resumed) == 1
  study.run_study(_config(), str(tmp_path), ["clead"], 1, train_fn=resume,
                  final_weights=fake_final_weights)
  assert len(resumed) == 1  # now finished


def test_a_failed_run_is_reported_and_the_others_go_on(tmp_path):
  def train_or_fail(config, run_dir):
    if config.seed == 1:
      raise UserError("non-finite loss at step 3")
    return _fake_report(config, run_dir, 0.9, {"pgd20": 0.5})

  summary = study.run_study(_config(), str(tmp_path), ["clead"], 3, train_fn=train_or_fail)
  row = summary["rows"][0]
  assert row["seeds_finished"] == [0, 2]
  assert row["seeds_failed"] == {"1": "non-finite loss at step 3"}
  text = (tmp_path / "study.md").read_text()
  assert "2/3 (1 failed)" in text and "FAILED: clead seed 1: non-finite loss" in text


def test_only_the_writer_writes_the_summary(tmp_path):
  # A non-writer process gets the report back but writes no run files either.
  fake = lambda config, run_dir: {"clean_accuracy": 0.9, "robust_accuracy": {"pgd20": 0.5},
                                  "steps": 1, "train_time_s": 1.0, "eval_time_s": 1.0}
  study.run_study(_config(), str(tmp_path), ["clead"], 1, train_fn=fake, is_writer=False)
  assert not os.listdir(tmp_path)


def test_cli_bad_sweep_is_one_line_and_exit_2(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "clead_jax.study", "--config", "configs/digits.py",
       "--workdir", str(tmp_path / "study"), "--sweep", "config.loss.lambda=1,2"],
      cwd=REPO, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), capture_output=True, text=True,
      timeout=120)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1].startswith(
      "error: --sweep 'config.loss.lambda=1,2': config.loss.lambda is not a config field")
  assert not os.path.exists(tmp_path / "study")


def test_the_transfer_attack_is_added_when_the_study_trains_its_surrogate(tmp_path):
  """The default suite gets transfer_pgd3 only when a standard run is in the study; each other
  run's surrogate is the standard run of its own seed, and the standard run does not attack
  itself."""
  assert "transfer_pgd3" not in study.default_eval_attacks(["pgd_at", "clead"])
  names = study.default_eval_attacks(["clead"], baselines=["standard"])
  assert names.split(",")[-1] == "transfer_pgd3" and "autoattack" in names
  config = _config(**{"eval.attacks": names})
  variants = study.make_variants(config, ["clead"], [], baselines=["standard"])
  by_method = {v.method: v for v in variants}
  clead = study.run_config(config, by_method["clead"], 3, str(tmp_path))
  assert clead.eval.surrogate == str(tmp_path / "standard" / "seed3")
  standard = study.run_config(config, by_method["standard"], 3, str(tmp_path))
  assert "transfer_pgd3" not in standard.eval.attacks and not standard.eval.surrogate


@pytest.mark.parametrize("name", ["cifar10_pgd_at", "cifar10_trades", "cifar10_wrn34",
                                  "cifar100_pgd_at", "cifar100_trades", "fashion_mnist"])
def test_recipe_configs_are_valid_and_documented(name):
  import importlib.util  # pylint: disable=g-import-not-at-top
  path = os.path.join(REPO, "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config_checks.validate(module.get_config())
  assert f"--config configs/{name}.py" in module.__doc__
