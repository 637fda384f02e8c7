"""Every number traceable to the weights that made it: reports, AutoAttack's saved progress,
cross-checks, exports and study rows carry fingerprints, and nothing of one model is merged into
the report of another; the study compares like with like.

Each test reproduces one way the code before fingerprints showed another model's numbers, mixed
unlike things, or crashed."""

import glob
import json
import os
import shutil

import jax
import numpy as np
import pytest

from clead_jax import config_tools
from clead_jax import input_pipeline
from clead_jax import provenance
from clead_jax import report as report_lib
from clead_jax.evaluation import autoattack_runner
from clead_jax.evaluation import sharded
from clead_jax.evaluation import workdir as workdir_lib
from clead_jax.errors import UserError
from clead_jax.study import runs as study
from tests import test_autoattack
from tests.conftest import digits_config
from tests.conftest import REPO
from tests.workdirs import random_weights_workdir

EXAMPLES = 40


def _config(**overrides):
  return digits_config(**{"model.width": 4, "eval.curve_points": 0, "attack.epsilon": 0.3,
                          "eval.num_examples": EXAMPLES, **overrides})


def _read(workdir, name="report.json"):
  with open(os.path.join(workdir, name)) as f:
    return json.load(f)


def _replace_checkpoints(workdir, config, seed, step=5):
  """Another model's checkpoints (same config, same step) where the workdir's were."""
  shutil.rmtree(os.path.join(workdir, "checkpoints"))
  random_weights_workdir(workdir, config, seed=seed, step=step)


# --- fingerprints ----------------------------------------------------------------------------------

def test_fingerprints_tell_weights_and_training_configs_apart():
  variables = {"params": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)},
               "batch_stats": {"mean": np.zeros(3, np.float32)}}
  same = jax.tree.map(np.copy, variables)
  assert provenance.weights_fingerprint(variables) == provenance.weights_fingerprint(same)
  nudged = jax.tree.map(np.copy, variables)
  nudged["params"]["w"][1, 2] = np.nextafter(np.float32(5), np.float32(6))
  assert provenance.weights_fingerprint(nudged) != provenance.weights_fingerprint(variables)
  statistics = jax.tree.map(np.copy, variables)
  statistics["batch_stats"]["mean"][0] = 1.0  # BatchNorm statistics count too
  assert provenance.weights_fingerprint(statistics) != provenance.weights_fingerprint(variables)

  config = _config()
  before = provenance.config_fingerprint(config)
  assert before == provenance.config_fingerprint(json.loads(config.to_json_best_effort()))
  for neutral in ({"eval.attacks": "cw"}, {"train.log_every": 7}, {"eval.num_examples": 3}):
    assert provenance.config_fingerprint(config_tools.set_fields(_config(), neutral)) == before
  for changed in ({"method": "pgd_at"}, {"seed": 1}, {"loss.lam": 0.5}, {"train.epochs": 2}):
    assert provenance.config_fingerprint(config_tools.set_fields(_config(), changed)) != before


# --- 1. a report never keeps another model's results -----------------------------------------------

def test_evaluate_after_the_checkpoints_were_replaced_never_reports_the_old_model(tmp_path, capsys):
  config = _config()
  workdir = random_weights_workdir(str(tmp_path / "run"), config, seed=0)
  old = workdir_lib.evaluate_workdir(workdir, attacks="fgsm,pgd20", progress=False)
  _replace_checkpoints(workdir, config, seed=1)
  new = workdir_lib.evaluate_workdir(workdir, attacks="fgsm", progress=False)

  assert set(new["robust_accuracy"]) == {"fgsm"}  # not the old model's PGD-20
  assert new["evaluation"]["weights_fingerprint"] != old["evaluation"]["weights_fingerprint"]
  assert new["worst_case_attacks"] == ["fgsm"]
  assert set(report_lib.read_examples(workdir)) == {"clean", "fgsm"}
  archived = _read(workdir, "report.5.json")
  assert archived == json.loads(json.dumps(old))  # kept whole, never merged
  assert os.path.exists(os.path.join(workdir, "report.5.examples.npz"))
  out = capsys.readouterr().out
  assert (f"the earlier report in {workdir} was of another evaluation (other weights "
          f"{old['evaluation']['weights_fingerprint']} -> "
          f"{new['evaluation']['weights_fingerprint']})") in out
  assert "kept as" in out and "report.5.json" in out


def test_a_rerun_of_training_without_checkpoints_starts_a_report_of_its_own(tmp_path):
  """The review's case: a finished C-LEAD run whose checkpoints were deleted, rerun as PGD-AT."""
  from clead_jax import train  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "run")
  fields = {"train.epochs": 1, "attack.steps": 2, "eval.attacks": "fgsm",
            "eval.batch_size": EXAMPLES}
  first = train.train_and_evaluate(_config(**fields, method="clead"), workdir)
  metrics_lines = open(os.path.join(workdir, "metrics.jsonl")).read().splitlines()
  with open(os.path.join(workdir, "crosscheck.md"), "w") as f:
    f.write("a cross-check of the first model\n")
  shutil.rmtree(os.path.join(workdir, "checkpoints"))
  second = train.train_and_evaluate(_config(**fields, method="pgd_at"), workdir)

  assert second["method"] == "pgd_at"
  assert _read(workdir, f"report.{first['steps']}.json") == json.loads(json.dumps(first))
  fingerprint, step = workdir_lib.final_weights_fingerprint(
      workdir, _config(**fields, method="pgd_at"), input_pipeline.load_dataset(_config().data),
      _mesh())
  assert step == second["steps"] and second["evaluation"]["weights_fingerprint"] == fingerprint
  assert fingerprint != first["evaluation"]["weights_fingerprint"]
  assert second["evaluation"]["config_fingerprint"] != first["evaluation"]["config_fingerprint"]
  assert not os.path.exists(os.path.join(workdir, "crosscheck.md"))  # it was of the first model
  assert os.path.exists(os.path.join(workdir, f"report.{first['steps']}.crosscheck.md"))
  # metrics.jsonl is of the second run alone; the first run's lines are kept beside it.
  steps = [json.loads(line)["step"] for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert len(steps) == len(set(steps))
  assert open(os.path.join(workdir, "metrics.1.jsonl")).read().splitlines() == metrics_lines


def _mesh():
  from clead_jax import parallel  # pylint: disable=g-import-not-at-top
  return parallel.make_mesh()


def test_an_imported_pytorch_file_replaced_at_the_same_path_starts_a_report_of_its_own(tmp_path):
  pytest.importorskip("torch")
  from clead_jax import torch_weights  # pylint: disable=g-import-not-at-top
  config = _config()
  dataset = input_pipeline.load_dataset(config.data)
  out = str(tmp_path / "model.pt")

  def export(seed):
    source = random_weights_workdir(str(tmp_path / f"source{seed}"), config, seed=seed)
    model = workdir_lib.train_state.build(config, dataset)
    state, step, _ = workdir_lib.restore_checkpoint(source, config, model, _mesh())
    torch_weights.export_state(config, jax.device_get(state.variables), step, dataset, out)

  imported = str(tmp_path / "imported")
  export(seed=0)
  old = workdir_lib.evaluate_torch_checkpoint(config, out, imported, attacks="fgsm,pgd20",
                                              progress=False)
  export(seed=1)
  new = workdir_lib.evaluate_torch_checkpoint(config, out, imported, attacks="fgsm",
                                              progress=False)
  assert set(new["robust_accuracy"]) == {"fgsm"}
  assert new["evaluation"]["weights_fingerprint"] != old["evaluation"]["weights_fingerprint"]
  archived = glob.glob(os.path.join(imported, "report.*.json"))
  assert len(archived) == 1  # named after the exported run's step
  assert _read(imported, os.path.basename(archived[0]))["robust_accuracy"] == old["robust_accuracy"]


def test_autoattack_progress_of_other_weights_is_set_aside(tmp_path, monkeypatch, capsys):
  """Progress saved for one model (a stopped evaluation) is never resumed on another."""
  config = _config()
  fresh = random_weights_workdir(str(tmp_path / "fresh"), config, seed=1)
  expected = workdir_lib.evaluate_workdir(fresh, attacks="autoattack", num_examples=24,
                                          progress=False)
  workdir = random_weights_workdir(str(tmp_path / "run"), config, seed=0)
  # As a stop at the very end leaves it: the first model's progress stays on disk.
  monkeypatch.setattr(autoattack_runner, "discard_state", lambda path: None)
  workdir_lib.evaluate_workdir(workdir, attacks="autoattack", num_examples=24, progress=False)
  monkeypatch.undo()
  state = os.path.join(workdir, workdir_lib.AUTOATTACK_STATE_DIR, "autoattack.npz")
  assert os.path.exists(state)
  _replace_checkpoints(workdir, config, seed=1)
  capsys.readouterr()
  report = workdir_lib.evaluate_workdir(workdir, attacks="autoattack", num_examples=24,
                                        progress=False)
  err = capsys.readouterr().err
  assert "is of another evaluation (differs in weights_fingerprint)" in err
  assert glob.glob(state + ".stale-*")  # set aside, not deleted
  assert report["robust_accuracy"] == expected["robust_accuracy"]
  assert np.array_equal(report_lib.read_examples(workdir)["autoattack"],
                        report_lib.read_examples(fresh)["autoattack"])


# --- 2. the study takes only a run's own final evaluation ------------------------------------------

STUDY_FIELDS = {"model.width": 8, "model.projection_dim": 16, "train.epochs": 1,
                "attack.steps": 2, "eval.num_examples": EXAMPLES, "eval.batch_size": EXAMPLES,
                "eval.curve_points": 0, "eval.attacks": "pgd20"}


def _study_config(**overrides):
  config = config_tools.load_config_file(os.path.join(REPO, "configs", "digits.py"))
  config_tools.set_fields(config, {**STUDY_FIELDS, **overrides})
  config.lock()
  return config


def test_the_study_evaluates_again_a_report_that_is_not_its_runs_final_evaluation(tmp_path,
                                                                                    capsys):
  from clead_jax import train  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "study")
  first = study.run_study(_study_config(), workdir, ["pgd_at"], 1)
  run = os.path.join(workdir, "pgd_at", "seed0")
  final = _read(run)
  calls = []

  def train_and_count(config, directory):
    calls.append(directory)
    return train.train_and_evaluate(config, directory)

  # Another evaluation of the run on fewer points (what `evaluate --num_examples=20` does).
  workdir_lib.evaluate_workdir(run, attacks="pgd20", num_examples=20, progress=False)
  capsys.readouterr()
  again = study.run_study(_study_config(), workdir, ["pgd_at"], 1, train_fn=train_and_count)
  assert calls == [run]
  assert "its report is stale (it is of 20 test examples" in capsys.readouterr().out
  assert _read(run)["num_examples"] == EXAMPLES
  assert again["rows"][0]["robust_accuracy"] == first["rows"][0]["robust_accuracy"]

  # The run's checkpoint replaced by another model's (same config, same step).
  config = workdir_lib.load_config(run)
  _replace_checkpoints(run, config, seed=3, step=final["steps"])
  calls.clear()
  capsys.readouterr()
  study.run_study(_study_config(), workdir, ["pgd_at"], 1, train_fn=train_and_count)
  assert calls == [run]
  assert "its report is stale (it is of weights" in capsys.readouterr().out
  assert _read(run)["evaluation"]["weights_fingerprint"] != final["evaluation"][
      "weights_fingerprint"]
  row_run = json.loads(open(os.path.join(workdir, "study.json")).read())["rows"][0]["runs"][0]
  assert row_run["weights_fingerprint"] == _read(run)["evaluation"]["weights_fingerprint"]

  # Its own final evaluation is taken as it is.
  calls.clear()
  study.run_study(_study_config(), workdir, ["pgd_at"], 1, train_fn=train_and_count)
  assert calls == []


# --- 3 and 4. like with like in the study's tables -------------------------------------------------

def _fake_run(config, run_dir, accuracy, flags, epsilon=None):
  """A finished run's files as training writes them: config.json, report.json (its identity of
  the final step) and the per-example flags."""
  os.makedirs(run_dir, exist_ok=True)
  clean = flags["clean"]
  report = {"method": config.method, "dataset": "digits", "model": "small_cnn", "norm": "linf",
            "epsilon": float(epsilon if epsilon is not None else config.attack.epsilon),
            "num_examples": len(clean), "clean_accuracy": float(np.mean(clean)),
            "robust_accuracy": accuracy, "steps": 1, "total_steps": 1, "train_time_s": 1.0,
            "eval_time_s": 1.0}
  worst = clean.copy()
  for name in accuracy:
    if "/" not in name:
      worst &= flags[name]
  report["worst_case_accuracy"] = float(np.mean(worst))  # over the report's own attacks
  with open(os.path.join(run_dir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(sort_keys=True, indent=2))
  with open(os.path.join(run_dir, "report.json"), "w") as f:
    json.dump(report, f)
  np.savez(os.path.join(run_dir, report_lib.EXAMPLES),
           **{k.replace("/", "__"): v for k, v in flags.items()})
  return report


def test_the_worst_case_of_every_run_is_over_the_attacks_all_runs_share(tmp_path):
  rng = np.random.default_rng(0)
  made = {}

  def fake_train(config, run_dir):
    flags = {"clean": rng.random(EXAMPLES) < 0.9}
    for name in ("pgd20", "autoattack", "autoattack_plus"):
      flags[name] = flags["clean"] & (rng.random(EXAMPLES) < 0.7)
    names = ["pgd20", "autoattack"] + (["autoattack_plus"] if config.seed == 1 else [])
    made[(config.method, config.seed)] = flags
    return _fake_run(config, run_dir, {n: float(np.mean(flags[n])) for n in names}, flags)

  summary = study.run_study(_study_config(), str(tmp_path), ["clead", "pgd_at"], 2,
                            train_fn=fake_train)
  for row in summary["rows"]:
    for run in row["runs"]:
      flags = made[(row["method"], run["seed"])]
      assert run["worst_case_accuracy"] == float(
          np.mean(flags["clean"] & flags["pgd20"] & flags["autoattack"]))
  assert summary["worst_case_attacks"] == ["pgd20", "autoattack"]
  markdown = open(tmp_path / "study.md").read()
  assert "every attack of pgd20, autoattack failed on, per example" in markdown


def test_deltas_are_only_between_rows_of_the_same_threat_model(tmp_path):
  def fake_train(config, run_dir):
    flags = {"clean": np.ones(EXAMPLES, bool)}
    flags["pgd20"] = np.arange(EXAMPLES) < (20 if config.method == "pgd_at" else 24)
    return _fake_run(config, run_dir, {"pgd20": float(np.mean(flags["pgd20"]))}, flags)

  study.run_study(_study_config(), str(tmp_path), ["clead"], 2, baselines=["pgd_at"],
                  sweeps=[("attack.epsilon", [0.2, 0.3])], train_fn=fake_train)
  markdown = open(tmp_path / "study_attack.epsilon.md").read()
  assert markdown.splitlines()[0].endswith("threat model per row")
  table = markdown.split("| method", 1)[1].split("\n\n", 1)[0].splitlines()[2:]
  rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in table}
  assert rows["clead attack.epsilon=0.2"][0] == "linf 0.2, 40 points"
  assert rows["clead attack.epsilon=0.2"][-2:] == ["+10.0", "+10.0 ± 0.0 (ahead in 2/2)"]
  assert rows["clead attack.epsilon=0.3"][0] == "linf 0.3, 40 points"
  assert rows["clead attack.epsilon=0.3"][-2:] == ["—", "—"]  # no PGD-AT row at epsilon 0.3


# --- 5. the crashes ---------------------------------------------------------------------------------

def test_autoattack_resumes_after_a_change_of_batch_size(tmp_path, capsys):
  """A run stopped mid-way with batch size 8 goes on with 16 (and back) to the flags of an
  uninterrupted run."""
  variables, images, labels = test_autoattack.linear_problem(n=48)
  images = (images * 255).astype(np.uint8)  # the Runner takes a split's uint8 images
  mesh = _mesh()
  make = lambda batch_size: autoattack_runner.Runner(
      test_autoattack.linear_apply, mesh, "linf", batch_size, seed=0,
      compiler_options=test_autoattack.FASTEST_COMPILE, **test_autoattack.SHARDED_SETTINGS)
  whole = make(8).run(variables, images, labels, 0.05)
  for saved_with, resumed_with in ((8, 16), (16, 8)):
    runner = make(saved_with)
    identity = runner._identity(0.05, len(labels), None)  # pylint: disable=protected-access
    # Stage 0, run 0, its first batch done: what a stop there saves.
    todo = np.flatnonzero(whole.clean)
    length = sharded.chunk_length(len(todo), runner.batch_size)
    robust = whole.clean.copy()
    robust[todo[:length]] = whole.robust_after[0][todo[:length]]
    progress = autoattack_runner._Progress(  # pylint: disable=protected-access
        clean=whole.clean.copy(), robust=robust, robust_after=[], run_todo=todo, chunks_done=1,
        size=sharded.bucket(length, runner.batch_size, mesh.devices.size))
    progress.batch_size, progress.devices = runner.batch_size, mesh.devices.size
    path = str(tmp_path / f"state{saved_with}.npz")
    runner._write(path, identity, progress)  # pylint: disable=protected-access
    capsys.readouterr()
    resumed = make(resumed_with).run(variables, images, labels, 0.05, state_path=path)
    assert f"made with batch size {saved_with}" in capsys.readouterr().out
    np.testing.assert_array_equal(resumed.robust_after, whole.robust_after)


def _evaluated_with_autoattack(workdir, **kwargs):
  return workdir_lib.evaluate_workdir(workdir, attacks="autoattack", num_examples=12,
                                      progress=False, **kwargs)


@pytest.mark.slow
def test_crosscheck_of_a_best_checkpoint_and_of_an_imported_file(tmp_path):
  pytest.importorskip("pyautoattack")
  from clead_jax import crosscheck  # pylint: disable=g-import-not-at-top
  from clead_jax import torch_weights  # pylint: disable=g-import-not-at-top
  config = _config()
  # The best checkpoint (step 3) is not among the last ones (step 10, other weights).
  best = random_weights_workdir(str(tmp_path / "best"), config, seed=0, step=3, best_step=3)
  shutil.rmtree(os.path.join(best, "checkpoints"))
  random_weights_workdir(best, config, seed=1, step=10)
  report = _evaluated_with_autoattack(best, checkpoint="best")
  result = crosscheck.crosscheck_workdir(best, num_examples=12)
  assert result["checkpoint_source"] == "best_checkpoint" and result["step"] == 3
  assert result["weights_fingerprint"] == report["evaluation"]["weights_fingerprint"]
  assert abs(result["robust_accuracy"]["ours"] - result["robust_accuracy"]["reference"]) <= 1 / 12

  # An imported PyTorch file: no checkpoints/ at all.
  dataset = input_pipeline.load_dataset(config.data)
  model = workdir_lib.train_state.build(config, dataset)
  state, step, _ = workdir_lib.restore_checkpoint(best, config, model, _mesh(), "best")
  out = str(tmp_path / "model.pt")
  torch_weights.export_state(config, jax.device_get(state.variables), step, dataset, out)
  imported = str(tmp_path / "imported")
  workdir_lib.evaluate_torch_checkpoint(config, out, imported, attacks="autoattack",
                                        num_examples=12, progress=False)
  result = crosscheck.crosscheck_workdir(imported, num_examples=12)
  assert result["checkpoint_source"].startswith("torch:")
  assert result["weights_fingerprint"] == report["evaluation"]["weights_fingerprint"]

  # The file replaced since: crosscheck refuses, naming both fingerprints.
  other = random_weights_workdir(str(tmp_path / "other"), config, seed=2)
  state, step, _ = workdir_lib.restore_checkpoint(other, config, model, _mesh())
  torch_weights.export_state(config, jax.device_get(state.variables), step, dataset, out)
  with pytest.raises(UserError, match="now holds weights"):
    crosscheck.crosscheck_workdir(imported, num_examples=12)
