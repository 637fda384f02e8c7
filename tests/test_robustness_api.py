"""clead_jax as a library (clead_jax/robustness.py): its promised names and signatures, the same
per-example results as the evaluate command, and the README's examples run as written."""

import functools
import glob
import inspect
import json
import os
import re

import jax
import numpy as np
import pytest

import clead_jax
from clead_jax import attacks as attacks_lib
from clead_jax import config_checks
from clead_jax import input_pipeline
from clead_jax import models
from clead_jax import parallel
from clead_jax import report as report_lib
from clead_jax import robustness
from clead_jax import train_state
from clead_jax.autoattack import versions
from clead_jax.errors import UserError
from clead_jax.evaluation import autoattack_runner
from clead_jax.evaluation import workdir as workdir_lib
from tests.conftest import digits_config
from tests.workdirs import random_weights_workdir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The documented API: a change here is a change of what users were promised.
_ATTACK = "(logits_fn, params, x, y, key, *, epsilon"
SIGNATURES = {
    "evaluate": "(logits_fn: Callable, images, labels, *, epsilon: float, norm: str = 'linf', "
                "attacks: Sequence[str] = ('autoattack',), batch_size: int = 512, seed: int = 0, "
                "state_dir: Optional[str] = None, progress: bool = True, params=None, "
                "autoattack_settings: Optional[dict] = None, indicators: bool = True) -> "
                "clead_jax.robustness.Result",
    "Result": "(report: dict, flags: dict) -> None",
    "fgsm": _ATTACK + ", norm='linf', init='none', objective=<function ce_objective>)",
    "pgd": _ATTACK + ", step_size, steps, norm='linf', init='uniform', "
                     "objective=<function ce_objective>, keep_misclassified=False)",
    "pgd_linf": _ATTACK + ", steps=20, step_size=None)",
    "pgd_l2": _ATTACK + ", steps=20, step_size=None)",
    "cw_linf": _ATTACK + ", steps=100, step_size=None)",
    "apgd": _ATTACK + ", norm='linf', loss='ce', targeted=False, n_iter=100, n_restarts=1, "
                      "n_target_classes=9)",
    "fab": _ATTACK + ", norm='linf', targeted=False, n_restarts=1, n_target_classes=9, "
                     "n_iter=100)",
    "square": _ATTACK + ", norm='linf', n_queries=5000)",
    "autoattack": _ATTACK + ", norm='linf', version='standard', n_iter=100, fab_iter=100, "
                            "n_queries=5000, n_target_classes=9)",
    "ce_objective": "(logits, embedding, labels)",
    "margin_objective": "(logits, embedding, labels)",
    "cross_entropy": "(logits, labels)",
    "margin": "(logits, labels)",
    "trades_kl": "(logits_clean, logits_adv)",
    "info_nce": "(z_clean, z_adv, labels, temperature: float = 0.1, positives: str = 'pair')",
    "clead_loss": "(logits_clean, logits_adv, z_clean, z_adv, labels, *, lam=1.0, "
                  "clean_weight=1.0, temperature=0.1, positives='pair')",
}
CONSTANTS = {
    "ATTACK_NAMES": ("fgsm", "pgd20", "pgd100", "cw", "autoattack", "autoattack_plus",
                     "autoattack_rand"),
    "AUTOATTACK_VERSIONS": ("standard", "plus", "rand"),
}
RESULT_MEMBERS = ("clean_accuracy", "robust_accuracy", "stage_accuracy", "worst_case_accuracy",
                  "worst_case", "attack_time_s", "warnings", "indicators", "to_json",
                  "to_markdown", "report", "flags")


def _signature(obj):
  text = str(inspect.signature(obj))
  return re.sub(r"<function (\w+) at 0x[0-9a-f]+>", r"<function \1>", text)


def test_public_names_and_their_signatures():
  assert sorted(robustness.__all__) == sorted(set(SIGNATURES) | set(CONSTANTS))
  submodules = ("evaluate", "autoattack")  # the command's module, the AutoAttack package
  assert clead_jax.PUBLIC_NAMES == tuple(n for n in robustness.__all__ if n not in submodules)
  for name in robustness.__all__:
    if name not in submodules:
      assert getattr(clead_jax, name) is getattr(robustness, name), name
    if name in CONSTANTS:
      assert tuple(getattr(robustness, name)) == CONSTANTS[name], name
    else:
      assert _signature(getattr(robustness, name)) == SIGNATURES[name], name
  for member in RESULT_MEMBERS:
    assert hasattr(robustness.Result, member) or member in ("report", "flags"), member


def test_bad_inputs_are_one_line_each():
  logits_fn = lambda x: x.reshape(x.shape[0], -1)[:, :10]
  images, labels = np.zeros((4, 4, 4, 1), np.float32), np.zeros(4, np.int32)
  for bad, expected in (((images[0], labels), "expected (N, height, width, channels)"),
                        ((images, labels[:3]), "one per image"),
                        ((images + 2.0, labels), "normalise inside logits_fn"),
                        ((images, labels.astype(np.float32)), "integer class indices")):
    with pytest.raises(ValueError, match=re.escape(expected)) as error:
      robustness.evaluate(logits_fn, *bad, epsilon=0.1)
    assert "\n" not in str(error.value)
  with pytest.raises(ValueError, match="surrogate"):
    robustness.evaluate(logits_fn, images, labels, epsilon=0.1, attacks=("transfer_pgd3",))


def test_the_attacks_are_the_suites_on_a_logits_function():
  """The wrappers take logits_fn(params, x) (or logits_fn(x) with params=None) and compute what
  the evaluation suite's attacks compute on apply_fn(variables, x) -> (logits, embedding)."""
  rng = np.random.default_rng(0)
  w = jax.numpy.asarray(rng.normal(size=(16, 10)).astype(np.float32))
  x = jax.numpy.asarray(rng.random((6, 4, 4, 1)).astype(np.float32))
  y = jax.numpy.asarray(rng.integers(0, 10, 6))
  key = jax.random.key(1)
  logits_fn = lambda params, images: images.reshape(images.shape[0], -1) @ params
  apply_fn = lambda variables, images: (logits_fn(variables, images),) * 2
  suite_attacks = attacks_lib.EVAL_ATTACKS
  for ours, theirs, norm in ((robustness.pgd_linf, suite_attacks["pgd20"], "linf"),
                             (robustness.pgd_l2, suite_attacks["pgd20"], "l2"),
                             (robustness.cw_linf, suite_attacks["cw"], "linf"),
                             (functools.partial(robustness.fgsm, norm="linf"),
                              suite_attacks["fgsm"], "linf")):
    np.testing.assert_allclose(ours(logits_fn, w, x, y, key, epsilon=0.1),
                               theirs(apply_fn, w, x, y, key, epsilon=0.1, norm=norm))
  closed_over = robustness.pgd_linf(lambda images: logits_fn(w, images), None, x, y, key,
                                    epsilon=0.1)
  np.testing.assert_allclose(closed_over, robustness.pgd_linf(logits_fn, w, x, y, key,
                                                              epsilon=0.1))
  for attack in (functools.partial(robustness.apgd, n_iter=5),
                 functools.partial(robustness.apgd, n_iter=5, loss="dlr", targeted=True,
                                   n_target_classes=2),
                 functools.partial(robustness.fab, n_iter=5),
                 functools.partial(robustness.square, n_queries=5)):
    x_adv = attack(logits_fn, w, x, y, key, epsilon=0.1)
    assert x_adv.shape == x.shape and float(jax.numpy.abs(x_adv - x).max()) <= 0.1 + 1e-6


# --- the same results as the evaluate command --------------------------------------------------

SMALL = dict(n_iter=10, fab_iter=10, n_queries=50, n_target_classes=3)


def test_evaluate_gives_the_evaluate_commands_flags(tmp_path, monkeypatch):
  """The library on a workdir's network and weights gives, per example, the AutoAttack flags
  that `python -m clead_jax.evaluate --workdir W --attacks=autoattack` wrote in W (both with
  smaller AutoAttack settings, patched in the same way for both)."""
  monkeypatch.setattr(versions, "stages", functools.partial(versions.stages, **SMALL))
  config = digits_config(**{"model.width": 4, "eval.curve_points": 0, "attack.epsilon": 0.05})
  workdir = random_weights_workdir(str(tmp_path / "run"), config, seed=3)
  cli = workdir_lib.evaluate_workdir(workdir, attacks="autoattack", num_examples=48,
                                     progress=False)
  expected = report_lib.read_examples(workdir)

  dataset = input_pipeline.load_dataset(config.data)
  model = train_state.build(config, dataset)
  state, _, _ = workdir_lib.restore_checkpoint(workdir, config, model, parallel.make_mesh())
  network = models.in_float32(model.network)
  logits_fn = lambda variables, x: network.apply(variables, x, train=False)[0]
  result = robustness.evaluate(logits_fn, dataset.test_images[:48], dataset.test_labels[:48],
                               epsilon=config.attack.epsilon, norm=config.attack.norm,
                               batch_size=config.eval.batch_size, seed=config.seed,
                               params=workdir_lib.evaluated_variables(state, config),
                               progress=False)
  assert set(expected) == set(result.flags) == {"clean", "autoattack", "autoattack/apgd_ce",
                                                "autoattack/apgd_t", "autoattack/fab_t",
                                                "autoattack/square"}
  for name, flags in expected.items():
    np.testing.assert_array_equal(result.flags[name], flags, err_msg=name)
  assert result.robust_accuracy == {"autoattack": cli["robust_accuracy"]["autoattack"]}
  assert result.report["robust_accuracy"] == cli["robust_accuracy"]
  assert result.report["indicators"]["fired"] == cli["indicators"]["fired"]
  assert 0 < result.clean_accuracy and "| autoattack |" in result.to_markdown()
  print(f"AutoAttack seconds (compilation included): evaluate command "
        f"{cli['attack_time_s']['autoattack']:.1f}, library "
        f"{result.attack_time_s['autoattack']:.1f}; clean {result.clean_accuracy:.3f}, "
        f"robust {result.robust_accuracy['autoattack']:.3f}")


def test_state_dir_keeps_the_report_and_skips_what_was_measured(tmp_path, capsys):
  w = np.random.default_rng(0).normal(size=(16, 10)).astype(np.float32)
  logits_fn = lambda params, x: x.reshape(x.shape[0], -1) @ params
  images = np.random.default_rng(1).integers(0, 256, (24, 4, 4, 1), dtype=np.uint8)
  labels = np.argmax(images.reshape(24, -1).astype(np.float32) / 255 @ w, -1)
  run = lambda attacks: robustness.evaluate(logits_fn, images, labels, epsilon=0.02,
                                            attacks=attacks, params=w, progress=False,
                                            state_dir=str(tmp_path), batch_size=8)
  first = run(("fgsm",))
  assert os.path.exists(tmp_path / "report.json")
  second = run(("fgsm", "pgd20"))
  assert second.attack_time_s["fgsm"] == first.attack_time_s["fgsm"]  # not measured again
  np.testing.assert_array_equal(second.flags["fgsm"], first.flags["fgsm"])
  assert set(second.robust_accuracy) == {"fgsm", "pgd20"}
  assert second.worst_case_accuracy == np.mean(second.worst_case)
  # The evaluation time is of every call on the report, not only of the last one.
  third = run(("fgsm", "pgd20"))
  assert third.report["eval_time_s"] > second.report["eval_time_s"] > first.report["eval_time_s"]
  other = robustness.evaluate(logits_fn, images, labels, epsilon=0.02, attacks=("fgsm",),
                              params=w * 2, progress=False, state_dir=str(tmp_path))
  assert set(other.robust_accuracy) == {"fgsm"}  # other weights: a new report
  assert "other weights" in capsys.readouterr().out


def test_indicators_false_leaves_them_out_and_changes_no_number(tmp_path):
  w = np.random.default_rng(0).normal(size=(16, 10)).astype(np.float32)
  logits_fn = lambda params, x: x.reshape(x.shape[0], -1) @ params
  images = np.random.default_rng(1).integers(0, 256, (24, 4, 4, 1), dtype=np.uint8)
  labels = np.argmax(images.reshape(24, -1).astype(np.float32) / 255 @ w, -1)
  run = lambda indicators, state_dir=None: robustness.evaluate(
      logits_fn, images, labels, epsilon=0.05, attacks=("fgsm", "pgd20"), params=w,
      progress=False, batch_size=8, indicators=indicators, state_dir=state_dir)
  with_them, without = run(True), run(False)
  assert "indicators" in with_them.report and "indicators" not in without.report
  assert without.robust_accuracy == with_them.robust_accuracy
  assert without.report["warnings"] == with_them.report["warnings"]
  # A report that had them loses them when evaluated again without: they were of other numbers.
  run(True, str(tmp_path))
  assert "indicators" not in run(False, str(tmp_path)).report
  with open(tmp_path / "report.json") as f:
    assert "indicators" not in json.load(f)


def test_autoattacks_black_box_warning_survives_a_resumed_evaluation():
  """AutoAttack measured by an earlier call (its stage flags in the report, so not run again):
  the black-box check is made from those flags, as if it had just run."""
  # pylint: disable=g-import-not-at-top
  from clead_jax.evaluation import checks
  from clead_jax.evaluation import suite
  w = np.random.default_rng(0).normal(size=(16, 10)).astype(np.float32)
  images = np.random.default_rng(1).integers(0, 256, (5, 4, 4, 1), dtype=np.uint8)
  labels = np.argmax(images.reshape(5, -1).astype(np.float32) / 255 @ w, -1)
  evaluator = suite.Evaluator(None, parallel.make_mesh(), "linf", 8, 0,
                              apply_fn=lambda v, x: (x.reshape(x.shape[0], -1) @ v, x))
  white, final = np.array([0, 1, 1, 1, 1], bool), np.array([0, 0, 1, 0, 1], bool)
  report = report_lib.Report(None, {}, {}, is_writer=False)
  report.add_clean(np.ones(5, bool))
  report.add_attack("autoattack", final, 1.0, stages={
      "autoattack/apgd_ce": white, "autoattack/apgd_t": white, "autoattack/fab_t": white,
      "autoattack/square": final})
  data = suite.evaluate(evaluator, w, images, labels, epsilon=0.05, attack_names=[],
                        report=report, with_indicators=False)
  expected = checks.black_box_warnings([autoattack_runner.Result(
      "autoattack", ["apgd_ce", "apgd_t", "fab_t", "square"], [False, False, False, True],
      np.ones(5, bool), np.stack([white, white, white, final]), 0.0)])
  assert len(expected) == 1 and "fooled 2 of 5 points" in expected[0]
  assert expected[0] in data["warnings"]


# --- the README's examples ---------------------------------------------------------------------

def _readme_blocks():
  with open(os.path.join(REPO, "README.md")) as f:
    text = f.read()
  section = text.split("\n## Use it as a library\n", 1)[1].split("\n## ", 1)[0]
  return re.findall(r"```python\n(.*?)```", section, re.S)


def test_the_readme_has_the_three_examples():
  blocks = _readme_blocks()
  assert len(blocks) == 3
  assert "from flax import nnx" in blocks[0] and "import equinox" in blocks[1]
  assert "nn.BatchNorm" in blocks[2] and "train=False" in blocks[2]


@pytest.mark.parametrize("index", [0, 1, 2], ids=["nnx", "equinox", "linen_batchnorm"])
def test_readme_example_runs_and_equals_the_runner(index, capsys):
  block = _readme_blocks()[index]
  if "import equinox" in block:
    pytest.importorskip("equinox")
  namespace = {"__name__": f"readme_example_{index}"}
  exec(compile(block, f"README.md, Use it as a library, example {index + 1}", "exec"),
       namespace)  # pylint: disable=exec-used
  assert capsys.readouterr().out  # the example prints its result
  result = namespace["result"]
  identity = result.report["evaluation"]
  # pylint: disable=protected-access
  images, labels = robustness._checked_arrays(namespace["images"], namespace["labels"])
  runner = autoattack_runner.Runner(
      robustness._apply_fn(namespace["logits_fn"], True), parallel.make_mesh(),
      identity["norm"], 512, identity["seed"], **identity["autoattack_settings"])
  expected = runner.run(namespace["params"], images, labels, identity["epsilon"])
  np.testing.assert_array_equal(result.flags["clean"], expected.clean)
  for stage, flags in zip(expected.stage_names, expected.robust_after):
    np.testing.assert_array_equal(result.flags[f"autoattack/{stage}"], flags, err_msg=stage)
  np.testing.assert_array_equal(result.flags["autoattack"], expected.robust_after[-1])
  assert any("other than the reference's" in w for w in result.warnings)
  print(index, result.clean_accuracy, result.robust_accuracy, jax.device_count())


# --- your own arrays: --config.data.name=npz:DIR -------------------------------------------------

def _npz_dataset(directory, train=300, test=60):
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  digits = load_digits()
  images = np.round(digits.images[:train + test, :, :, None] * (255 / 16)).astype(np.uint8)
  labels = digits.target[:train + test]
  os.makedirs(directory, exist_ok=True)
  np.savez(os.path.join(directory, "train.npz"), images=images[:train], labels=labels[:train])
  np.savez(os.path.join(directory, "test.npz"), images=images[train:], labels=labels[train:])
  return directory


def test_an_npz_dataset_trains_and_evaluates(tmp_path):
  from clead_jax import train  # pylint: disable=g-import-not-at-top
  data = _npz_dataset(str(tmp_path / "arrays"))
  config = digits_config(**{"data.name": f"npz:{data}", "method": "pgd_at", "model.width": 4,
                            "eval.curve_points": 0, "eval.attacks": "fgsm",
                            "eval.num_examples": 40, "train.batch_size": 64})
  dataset = input_pipeline.load_dataset(config.data)
  assert (dataset.num_classes, dataset.image_shape) == (10, (8, 8, 1))
  assert dataset.train_images.dtype == np.uint8 and 0.2 < dataset.mean[0] < 0.4
  workdir = str(tmp_path / "run")
  trained = train.train_and_evaluate(config, workdir)
  assert trained["dataset"] == f"npz:{data}" and trained["num_examples"] == 40
  again = workdir_lib.evaluate_workdir(workdir, attacks="pgd20", progress=False)
  assert set(again["robust_accuracy"]) == {"fgsm", "pgd20"}


def test_bad_npz_datasets_are_one_line_each(tmp_path):
  good = _npz_dataset(str(tmp_path / "good"), train=40, test=10)
  train_images = np.load(os.path.join(good, "train.npz"))["images"]
  train_labels = np.load(os.path.join(good, "train.npz"))["labels"]
  cases = {
      "no_dir": (None, "is not a directory"),
      "no_test": ({"train": dict(images=train_images, labels=train_labels)},
                  "test.npz does not exist"),
      "float_images": ({"test": dict(images=train_images / 255.0, labels=train_labels)},
                       "expected uint8 of shape (N, height, width, channels)"),
      "no_labels": ({"test": dict(images=train_images)}, "has no 'labels' array"),
      "few_labels": ({"test": dict(images=train_images, labels=train_labels[:-1])},
                     "one per image"),
      "negative": ({"test": dict(images=train_images, labels=train_labels - 1)},
                   "labels are class indices"),
      "unseen_class": ({"test": dict(images=train_images, labels=train_labels + 1)},
                       "every class needs training images"),
      "other_shape": ({"test": dict(images=train_images[:, :4], labels=train_labels)},
                      "both splits need one image shape"),
  }
  for case, (arrays, expected) in cases.items():
    directory = str(tmp_path / case)
    if arrays is not None:
      os.makedirs(directory)
      for split in ("train", "test"):
        np.savez(os.path.join(directory, f"{split}.npz"),
                 **arrays.get(split, dict(images=train_images, labels=train_labels)))
      if case == "no_test":
        os.remove(os.path.join(directory, "test.npz"))
    config = digits_config(**{"data.name": f"npz:{directory}"})
    with pytest.raises(UserError, match=re.escape(expected)) as error:
      input_pipeline.load_dataset(config.data)
    assert "\n" not in str(error.value), case
  with pytest.raises(UserError, match="npz:DIR"):
    config_checks.validate(digits_config(**{"data.name": "my data"}))


# --- any TFDS image-classification dataset ------------------------------------------------------

_BUILDERS = {}


def _tfds_builders():
  """Two TFDS datasets clead_jax does not list, made from scikit-learn's digits (real images on
  every machine, no network): one fit for training, one without labels."""
  if _BUILDERS:
    return _BUILDERS
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  tfds = input_pipeline.import_tfds()
  digits = load_digits()
  images = np.round(digits.images[..., None] * (255 / 16)).astype(np.uint8)

  class CleadTestDigits(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")
    FEATURES = {"image": tfds.features.Image(shape=(8, 8, 1)),
                "label": tfds.features.ClassLabel(num_classes=10)}

    def _info(self):
      return tfds.core.DatasetInfo(builder=self,
                                   features=tfds.features.FeaturesDict(self.FEATURES))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples(0, 300), "test": self._generate_examples(300, 360)}

    def _generate_examples(self, start, end):  # pylint: disable=arguments-differ
      for i in range(start, end):
        example = {"image": images[i], "label": int(digits.target[i])}
        yield i, {key: example[key] for key in self.FEATURES}

  class CleadTestUnlabelled(CleadTestDigits):
    FEATURES = {"image": tfds.features.Image(shape=(8, 8, 1))}

  _BUILDERS.update(good="clead_test_digits", unlabelled="clead_test_unlabelled")
  assert {CleadTestDigits.name, CleadTestUnlabelled.name} == set(_BUILDERS.values())
  return _BUILDERS


def test_a_tfds_dataset_clead_jax_does_not_list_trains_and_evaluates(tmp_path):
  from clead_jax import train  # pylint: disable=g-import-not-at-top
  name = _tfds_builders()["good"]
  assert name not in input_pipeline.DATASETS
  data_dir = str(tmp_path / "tfds")
  config = digits_config(**{"data.name": name, "data.data_dir": data_dir, "model.width": 4,
                            "eval.curve_points": 0, "eval.attacks": "fgsm",
                            "eval.num_examples": 30, "train.batch_size": 64})
  config_checks.validate(config)
  dataset = input_pipeline.load_dataset(config.data)  # prepared here: generated, no download
  assert (dataset.num_classes, dataset.image_shape, len(dataset.test_labels)) == (10, (8, 8, 1),
                                                                                 60)
  stats = glob.glob(os.path.join(data_dir, name, "*", input_pipeline.STATS_FILE))
  assert len(stats) == 1
  pixels = dataset.train_images.astype(np.float64) / 255.0
  np.testing.assert_allclose(dataset.mean, [pixels.mean()], rtol=1e-6)
  np.testing.assert_allclose(dataset.std, [pixels.std()], rtol=1e-6)
  with open(stats[0], "w") as f:  # computed once: the cached numbers are the ones used
    json.dump({"mean": [0.25], "std": [0.5]}, f)
  assert input_pipeline.load_dataset(config.data).mean == (0.25,)
  workdir = str(tmp_path / "run")
  trained = train.train_and_evaluate(config, workdir)
  assert trained["dataset"] == name and "fgsm" in trained["robust_accuracy"]
  again = workdir_lib.evaluate_workdir(workdir, attacks="pgd20", progress=False)
  assert set(again["robust_accuracy"]) == {"fgsm", "pgd20"}


def test_unsuitable_tfds_datasets_are_one_line_each(tmp_path):
  builders = _tfds_builders()
  data_dir = str(tmp_path / "tfds")
  cases = ((builders["unlabelled"], True, "needs an 'image' (Image) and a 'label' (ClassLabel)"),
           (builders["good"], False, "is not prepared in"),
           ("no_such_tfds_dataset_here", True, "or the name of a TFDS image-classification"))
  for name, download, expected in cases:
    config = digits_config(**{"data.name": name, "data.data_dir": data_dir,
                              "data.download": download})
    with pytest.raises(UserError, match=re.escape(expected)) as error:
      input_pipeline.load_dataset(config.data)
    assert "\n" not in str(error.value) and name in str(error.value)
  for unknown in ("Not A Name!", "no_such_tfds_dataset_here", "mnist_typo"):
    with pytest.raises(UserError, match="is unknown.*TFDS image-classification dataset"):
      config_checks.validate(digits_config(**{"data.name": unknown}))


def test_clead_loss_is_the_training_methods():
  """robustness.clead_loss on the logits and embeddings equals methods.clead_loss, the loss C-LEAD
  trains with (the config's lam, clean_weight, temperature and positives)."""
  from clead_jax import methods  # pylint: disable=g-import-not-at-top
  config = digits_config(**{"model.width": 4, "loss.lam": 0.7, "loss.clean_weight": 0.3,
                            "loss.positives": "class"})
  network = models.build_network(config.model, 10, (0.5,), (0.25,))
  rng = np.random.default_rng(0)
  x = jax.numpy.asarray(rng.random((6, 8, 8, 1)).astype(np.float32))
  x_adv = jax.numpy.clip(x + 0.1 * jax.numpy.asarray(rng.standard_normal(x.shape)), 0, 1)
  y = jax.numpy.asarray([0, 1, 1, 2, 3, 0])
  variables = network.init(jax.random.key(0), x, train=False)
  expected, _ = methods.clead_loss(methods.Context(network, config), variables["params"],
                                   variables["batch_stats"], x, x_adv, y)
  both = jax.numpy.stack([x, x_adv], axis=1).reshape((-1,) + x.shape[1:])  # as the method pairs
  (logits, z), _ = network.apply(variables, both, train=True, mutable=["batch_stats"])
  ours = robustness.clead_loss(logits[0::2], logits[1::2], z[0::2], z[1::2], y, lam=0.7,
                               clean_weight=0.3, temperature=config.loss.temperature,
                               positives="class")
  np.testing.assert_allclose(ours, expected, rtol=1e-5)
