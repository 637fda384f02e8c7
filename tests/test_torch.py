"""JAX <-> PyTorch: every registry backbone exported to PyTorch computes our logits, the round trip
gives our parameters back, RobustBench's own classes load our exports and theirs load into ours,
and our AutoAttack is never weaker than the reference on a trained digits network."""

import importlib.util
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from clead_jax import torch_weights
from clead_jax import models
from tests.conftest import REPO, digits_config

torch = pytest.importorskip("torch", reason="PyTorch is an optional extra: pip install -e '.[torch]'")

# (config.model fields, image shape): every backbone of the registry, small.
BACKBONES = {
    "small_cnn": ({"name": "small_cnn", "width": 8}, (8, 8, 1)),
    "mnist_cnn": ({"name": "mnist_cnn", "width": 8}, (28, 28, 1)),
    "resnet18": ({"name": "resnet18", "width": 8}, (32, 32, 3)),
    "preact_resnet18": ({"name": "preact_resnet18", "width": 8}, (32, 32, 3)),
    "wide_resnet": ({"name": "wide_resnet", "depth": 10, "widen": 2}, (16, 16, 3)),
}
MEAN, STD = 0.4, 0.25


def _model_config(fields):
  return ml_collections.ConfigDict({"name": "", "width": 8, "depth": 10, "widen": 1,
                                    "dtype": "float32", "projection_dim": 16, **fields})


def _random_variables(network, image_shape, seed=0):
  """Initialised parameters with BatchNorm statistics and affine terms far from their initial
  values, so that eval mode is really tested."""
  variables = network.init(jax.random.key(seed), jnp.zeros((1,) + image_shape), train=False)
  rng = np.random.default_rng(seed)

  def perturb(path, a):
    name = str(getattr(path[-1], "key", path[-1]))
    a = np.asarray(a)
    if name == "var":
      return rng.uniform(0.5, 2.0, a.shape).astype(a.dtype)
    if name in ("mean", "bias", "scale"):
      return (a + rng.normal(0, 0.2, a.shape)).astype(a.dtype)
    return a

  return jax.tree_util.tree_map_with_path(perturb, jax.device_get(variables))


def _setup(name, num_classes=10):
  fields, image_shape = BACKBONES[name]
  config = _model_config(fields)
  channels = image_shape[-1]
  network = models.build_network(config, num_classes, [MEAN] * channels, [STD] * channels)
  return config, network, image_shape


def _torch_logits(module, x):
  with torch.no_grad():
    return module(torch.as_tensor(np.asarray(x)).permute(0, 3, 1, 2).contiguous()).numpy()


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_exported_model_computes_our_logits(name):
  config, network, image_shape = _setup(name)
  variables = _random_variables(network, image_shape)
  state, _ = torch_weights.to_torch(config, variables)
  arch = torch_weights.architecture(config, image_shape, 10)
  module = torch_weights.torch_module(arch, [MEAN] * image_shape[-1], [STD] * image_shape[-1], state)
  inputs = [np.random.default_rng(1).uniform(0, 1, (6,) + image_shape).astype(np.float32)]
  if name == "small_cnn":  # real digits too
    from clead_jax import input_pipeline  # pylint: disable=g-import-not-at-top
    dataset = input_pipeline.load_dataset(digits_config().data)
    inputs.append(input_pipeline.to_float(dataset.test_images[:32]))
  for x in inputs:
    ours = np.asarray(network.apply(variables, jnp.asarray(x), train=False)[0])
    theirs = _torch_logits(module, x)
    scale = max(1.0, float(np.max(np.abs(ours))))
    assert np.max(np.abs(ours - theirs)) <= 1e-4 * scale, np.max(np.abs(ours - theirs))


def test_the_exported_files_predict_as_ours_on_every_digits_test_image(tmp_path):
  """FILE.pt and FILE.py, loaded as a user loads them (not our torch_models), give our predictions
  on all 360 digits test images; a changed tensor in FILE.pt shows as a large difference."""
  from clead_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  config = digits_config(**{"model.width": 8})
  dataset = input_pipeline.load_dataset(config.data)
  network = models.build_network(config.model, dataset.num_classes, dataset.mean, dataset.std)
  variables = _random_variables(network, tuple(dataset.image_shape))
  out = str(tmp_path / "digits.pt")
  torch_weights.export_state(config, variables, 7, dataset, out)
  images = input_pipeline.to_float(dataset.test_images)
  check = torch_weights.compare_export(out, network, variables, images)
  assert check["examples"] == 360 and check["same_predictions"] == 360, check
  assert check["max_abs_diff"] <= 1e-4 * max(1.0, check["logit_scale"]), check

  saved = torch.load(out, weights_only=False)
  name = next(k for k in saved["state_dict"] if k.endswith("weight"))
  saved["state_dict"][name] = saved["state_dict"][name] * 1.5
  torch.save(saved, out)
  changed = torch_weights.compare_export(out, network, variables, images)
  assert changed["max_abs_diff"] > 1e-2 * max(1.0, changed["logit_scale"]), changed


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_round_trip_gives_the_same_parameters(name):
  config, network, image_shape = _setup(name)
  variables = _random_variables(network, image_shape, seed=3)
  state, head = torch_weights.to_torch(config, variables)
  abstract = jax.eval_shape(lambda: network.init(jax.random.key(0),
                                                 jnp.zeros((1,) + image_shape), train=False))
  back = torch_weights.from_torch(config, state, abstract, head=head)
  flat = lambda tree: {jax.tree_util.keystr(p): np.asarray(v)
                       for p, v in jax.tree_util.tree_leaves_with_path(tree)}
  want, got = flat(jax.device_get(variables)), flat(back)
  assert want.keys() == got.keys()
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def _robustbench(file):
  """A module of robustbench's model_zoo/architectures, loaded by path: importing the robustbench
  package itself pulls in torchvision and more, which the architectures do not need."""
  spec = importlib.util.find_spec("robustbench")
  if spec is None:
    pytest.skip("robustbench is a test extra: pip install --no-deps robustbench==1.1.1")
  path = os.path.join(os.path.dirname(spec.origin), "model_zoo", "architectures", file)
  module_spec = importlib.util.spec_from_file_location(f"robustbench_{file[:-3]}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def _robustbench_model(name):
  if name == "resnet18":
    return _robustbench("resnet.py").ResNet18()
  if name == "preact_resnet18":
    resnet = _robustbench("resnet.py")
    return resnet.PreActResNet(resnet.PreActBlock, [2, 2, 2, 2], bn_before_fc=True,
                               out_shortcut=True)
  return _robustbench("wide_resnet.py").WideResNet(depth=16, num_classes=10, widen_factor=4)


RB_FIELDS = {"resnet18": {"name": "resnet18", "width": 64},
             "preact_resnet18": {"name": "preact_resnet18", "width": 64},
             "wide_resnet": {"name": "wide_resnet", "depth": 16, "widen": 4}}


@pytest.mark.parametrize("name", sorted(RB_FIELDS))
def test_robustbench_classes_and_ours_exchange_weights(name):
  """RobustBench's own class with random weights and statistics, imported into our Flax model,
  gives its logits; and our export loads into its class with strict=True."""
  rb = _robustbench_model(name).eval()
  generator = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for module in rb.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.running_mean.normal_(0, 0.2, generator=generator)
        module.running_var.uniform_(0.5, 2.0, generator=generator)
        module.weight.normal_(1, 0.2, generator=generator)
        module.bias.normal_(0, 0.2, generator=generator)
  config = _model_config(RB_FIELDS[name])
  network = models.build_network(config, 10, [0.0] * 3, [1.0] * 3)  # RobustBench: no normalisation
  abstract = jax.eval_shape(lambda: network.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                                 train=False))
  state = {k: v.numpy() for k, v in rb.state_dict().items()}
  variables = torch_weights.from_torch(config, state, abstract)
  x = np.random.default_rng(2).uniform(0, 1, (4, 32, 32, 3)).astype(np.float32)
  ours = np.asarray(network.apply(variables, jnp.asarray(x), train=False)[0])
  theirs = _torch_logits(rb, x)
  assert np.max(np.abs(ours - theirs)) <= 1e-4 * max(1.0, float(np.max(np.abs(theirs))))
  exported, _ = torch_weights.to_torch(config, variables)
  fresh = _robustbench_model(name)
  fresh.load_state_dict({k: torch.as_tensor(v) for k, v in exported.items()}, strict=True)
  assert torch_weights.robustbench_class(torch_weights.architecture(config, (32, 32, 3), 10),
                                  (32, 32, 3)).get("none") is None


def test_a_mismatched_checkpoint_names_the_first_offending_tensor():
  config, network, image_shape = _setup("small_cnn")
  variables = _random_variables(network, image_shape)
  state, _ = torch_weights.to_torch(config, variables)
  abstract = jax.eval_shape(lambda: network.init(jax.random.key(0),
                                                 jnp.zeros((1,) + image_shape), train=False))
  wider = dict(state, **{"conv1.weight": np.zeros((9, 1, 3, 3), np.float32)})
  with pytest.raises(torch_weights.UserError, match=r"tensor 'conv1.weight' has shape \(9, 1, 3, 3\).*"
                                             r"needs \(8, 1, 3, 3\)"):
    torch_weights.from_torch(config, wider, abstract)
  missing = {k: v for k, v in state.items() if k != "bn2.running_var"}
  with pytest.raises(torch_weights.UserError, match="tensor 'bn2.running_var' is missing"):
    torch_weights.from_torch(config, missing, abstract)
  nested = {"state_dict": {f"module.{k}": v for k, v in state.items()}}
  assert torch_weights.unwrap_state_dict(nested).keys() == state.keys()


def _train_pgd_at_digits(workdir):
  from clead_jax import train  # pylint: disable=g-import-not-at-top
  config = digits_config(**{"method": "pgd_at", "train.epochs": 10, "model.width": 16,
                            "attack.steps": 5, "eval.attacks": "autoattack",
                            "eval.num_examples": 100, "eval.curve_points": 0,
                            "train.learning_rate": 0.05})
  return train.train_and_evaluate(config, workdir)


@pytest.fixture(scope="module")
def adversarially_trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("pgd_at_digits"))
  report = _train_pgd_at_digits(workdir)
  return workdir, report


@pytest.mark.slow
def test_export_command_and_evaluate_of_the_export(adversarially_trained, tmp_path):
  """export writes FILE.pt and FILE.py; evaluate --torch_checkpoint of it gives our report's
  accuracies."""
  workdir, report = adversarially_trained
  out = str(tmp_path / "model.pt")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  done = subprocess.run([sys.executable, "-m", "clead_jax.export", "--workdir", workdir,
                         "--out", out], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert os.path.exists(out) and os.path.exists(str(tmp_path / "model.py"))
  assert "PyTorch and JAX agree on 360 of 360 test predictions" in done.stdout, done.stdout
  evaluated = subprocess.run(
      [sys.executable, "-m", "clead_jax.evaluate", "--torch_checkpoint", out, "--config",
       os.path.join(REPO, "configs", "digits.py"), "--config.model.width=16",
       "--workdir", str(tmp_path / "imported"), "--attacks=fgsm", "--num_examples=100"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  import json  # pylint: disable=g-import-not-at-top
  imported = json.load(open(tmp_path / "imported" / "report.json"))
  assert imported["clean_accuracy"] == report["clean_accuracy"]
  assert "train_time_s" not in imported  # not trained here: no "Train time 0.0 s"
  assert "Train time" not in (tmp_path / "imported" / "report.md").read_text()


@pytest.mark.slow
def test_our_autoattack_is_never_weaker_than_the_reference(adversarially_trained):
  """On a BatchNorm CNN trained with PGD-AT: AutoAttack standard, each of its stages, APGD-CE
  alone and Square alone leave at most one example more robust in ours than in the reference."""
  pytest.importorskip("pyautoattack", reason="the reference AutoAttack: pip install pyautoattack")
  from clead_jax import crosscheck  # pylint: disable=g-import-not-at-top
  from clead_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  from clead_jax.autoattack import square  # pylint: disable=g-import-not-at-top
  workdir, report = adversarially_trained
  assert report["robust_accuracy"]["autoattack"] > 0.2  # something left for the stages
  result = crosscheck.crosscheck_workdir(workdir, num_examples=100)
  n = result["num_examples"]
  assert result["clean_accuracy"]["ours"] == result["clean_accuracy"]["reference"]
  assert result["robust_accuracy"]["ours"] <= result["robust_accuracy"]["reference"] + 1 / n
  for stage, values in result["stages"].items():
    if values["reference"] is not None:
      assert values["ours"] <= values["reference"] + 1 / n + 1e-9, (stage, values)
  assert os.path.exists(os.path.join(workdir, "crosscheck.md"))
  # Both implementations' seconds per stage, ours from the report of this very evaluation.
  for stage, values in result["stages"].items():
    assert values["ours_time_s"] == report["attack_time_s"][f"autoattack/{stage}"] > 0, stage
    assert values["reference_time_s"] is not None, stage
  assert result["time_s"]["ours"] == report["attack_time_s"]["autoattack"]

  # APGD-CE alone is our first stage (one restart, as in the standard version: the reference's
  # 'custom' version would run its constructor's 5); Square alone is run here on the same points.
  from clead_jax import train_state, parallel  # pylint: disable=g-import-not-at-top
  from clead_jax.evaluation import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  config = workdir_lib.load_config(workdir)
  dataset = input_pipeline.load_dataset(config.data)
  model = train_state.build(config, dataset)
  state, _, _ = workdir_lib.restore_checkpoint(workdir, config, model, parallel.make_mesh())
  variables = jax.device_get(state.variables)
  arch = torch_weights.architecture(config.model, dataset.image_shape, dataset.num_classes)
  module = torch_weights.torch_module(arch, dataset.mean, dataset.std,
                               torch_weights.to_torch(config.model, variables)[0])
  x = input_pipeline.to_float(dataset.test_images[:n])
  y = dataset.test_labels[:n]
  apply_fn = lambda v, xx: model.network.apply(v, xx, train=False)
  for attacks, ours in (
      (["apgd-ce"], None),
      (["square"], jax.jit(lambda v, xx, yy, k: square.square(
          apply_fn, v, xx, yy, k, epsilon=config.attack.epsilon, norm="linf")))):
    reference, _, _ = crosscheck.reference_autoattack(
        module, x, y, epsilon=config.attack.epsilon, norm="linf", version="custom",
        attacks=attacks, apgd_restarts=1)
    if ours is None:
      import numpy  # pylint: disable=g-import-not-at-top,reimported
      with numpy.load(os.path.join(workdir, "report_examples.npz")) as saved:
        robust = saved["autoattack__apgd_ce"][:n]
    else:
      from clead_jax import perturbation  # pylint: disable=g-import-not-at-top
      keys = perturbation.example_keys(config.seed, jnp.arange(n))
      x_adv = ours(variables, jnp.asarray(x), jnp.asarray(y), keys)
      after = np.asarray(jnp.argmax(apply_fn(variables, x_adv)[0], -1)) == y
      clean = np.asarray(jnp.argmax(apply_fn(variables, jnp.asarray(x))[0], -1)) == y
      robust = after & clean
    assert robust.sum() <= reference.sum() + 1, (attacks, int(robust.sum()), int(reference.sum()))
