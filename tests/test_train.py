"""Each method's train step runs, compiles once, and lowers its own loss on a fixed batch;
the end-to-end run writes the report contract."""

import json
import os

import chex
import numpy as np
import pytest

from clead_jax import input_pipeline
from clead_jax import methods
from clead_jax import parallel
from clead_jax import train
from clead_jax import train_state
from tests.conftest import digits_config

REPORT_KEYS = {"method", "dataset", "model", "norm", "epsilon", "num_examples", "clean_accuracy",
               "robust_accuracy", "steps", "train_time_s", "eval_time_s"}


@pytest.mark.parametrize("method", sorted(methods.METHODS))
def test_train_step_lowers_loss_on_a_fixed_batch(method):
  config = digits_config(**{"method": method, "train.schedule": "constant",
                            "train.learning_rate": 0.05, "attack.steps": 3})
  if method == "clead":
    config.attack.objective = "both"  # exercises the contrastive attack objective too
  dataset = input_pipeline.load_dataset(config.data)
  model = train_state.build(config, dataset)
  network, schedule, tx = model.network, model.schedule, model.tx
  mesh = parallel.make_mesh()
  state = train_state.init_state(model, 0, mesh)
  step_fn = train.make_train_step(methods.Context(network, config), methods.METHODS[method],
                                  tx, schedule)
  chex.clear_trace_counter()  # the counter is keyed by code, shared by the parametrisations
  step_fn = train.jit_train_step(chex.assert_max_traces(step_fn, n=1), mesh)
  batch = {"image": dataset.train_images[:64], "label": dataset.train_labels[:64]}
  losses = []
  for _ in range(12):
    state, metrics = step_fn(state, batch)
    losses.append(float(metrics["loss"]))
  assert np.all(np.isfinite(losses))
  assert np.mean(losses[-3:]) < 0.8 * losses[0], losses
  assert int(state.step) == 12


def test_end_to_end_run_writes_the_report_contract(trained_digits):
  config, workdir, report = trained_digits
  on_disk = json.load(open(os.path.join(workdir, "report.json")))
  assert REPORT_KEYS <= set(on_disk)
  assert set(on_disk["robust_accuracy"]) == {"fgsm", "pgd20"}
  assert on_disk["num_examples"] == config.eval.num_examples
  for value in [on_disk["clean_accuracy"], *on_disk["robust_accuracy"].values()]:
    assert 0.0 <= value <= 1.0
  assert on_disk == json.loads(json.dumps(report))
  for name in ["report.md", "robustness_curve.png", "metrics.jsonl", "config.json"]:
    assert os.path.getsize(os.path.join(workdir, name)) > 0
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  lines = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert {"loss", "ce_clean", "clean_accuracy", "images_per_s"} <= set(lines[-1])
  curve = on_disk["robustness_curve"]
  assert curve["epsilon"][0] == 0.0 and curve["accuracy"][0] == on_disk["clean_accuracy"]


def test_pretraining_then_clead_and_init_from(tmp_path, trained_digits):
  _, source_workdir, _ = trained_digits
  config = digits_config(**{"method": "clead", "train.epochs": 2, "train.pretrain_epochs": 1,
                            "model.width": 16, "eval.attacks": "pgd20", "eval.curve_points": 0,
                            "eval.num_examples": 40, "train.init_from": source_workdir})
  report = train.train_and_evaluate(config, str(tmp_path))
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert "info_nce" not in lines[0] and "info_nce" in lines[-1]  # standard first, then C-LEAD
  assert report["clean_accuracy"] > 0.5  # started from the trained model, not from scratch


def test_best_checkpoint_is_the_best_evaluation_and_evaluate_can_load_it(tmp_path, monkeypatch):
  """With eval_every, DIR/best_checkpoint keeps the one step whose validation PGD-20 accuracy was
  the highest so far, chosen without evaluating any test image (every batch the evaluator sees
  during training is a validation image), and `evaluate --checkpoint=best` evaluates that step."""
  from clead_jax.evaluation import suite  # pylint: disable=g-import-not-at-top
  from clead_jax.evaluation import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  seen = []
  original = suite.Evaluator.correct

  def recording(self, variables, images, labels, *args, **kwargs):
    seen.append(np.asarray(images).copy())
    return original(self, variables, images, labels, *args, **kwargs)

  monkeypatch.setattr(suite.Evaluator, "correct", recording)
  config = digits_config(**{"method": "pgd_at", "train.epochs": 4, "train.eval_every": 1,
                            "data.validation_size": 200,
                            "model.width": 8, "attack.steps": 2, "eval.attacks": "pgd20",
                            "eval.curve_points": 0, "eval.num_examples": 60,
                            "eval.during_train_examples": 100})
  train.train_and_evaluate(config, str(tmp_path))
  dataset = input_pipeline.load_dataset(config.data)
  during_training = seen[:2 * 3]  # clean and PGD-20 at each of the three validation evaluations
  for images in during_training:
    np.testing.assert_array_equal(images, dataset.validation_images[:len(images)])
  test = dataset.test_images[:60]
  assert not any(len(i) == len(test) and np.array_equal(i, test) for i in during_training)
  assert all(np.array_equal(i, test) for i in seen[2 * 3:])  # then the final report only
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  evals = {l["step"]: l["validation/pgd20_accuracy"] for l in lines
           if "validation/pgd20_accuracy" in l}
  assert sorted(evals) == [9, 18, 27]  # every epoch but the last, which the final report covers
  kept = sorted(int(s) for s in os.listdir(tmp_path / "best_checkpoint") if s.isdigit())
  assert len(kept) == 1 and evals[kept[0]] == max(evals.values()), (kept, evals)
  report = workdir_lib.evaluate_workdir(str(tmp_path), attacks="pgd20", checkpoint="best",
                                        num_examples=60, progress=False)
  assert report["steps"] == kept[0]
  assert report["checkpoint"]["step"] == kept[0] and "validation" in report["checkpoint"]["rule"]
