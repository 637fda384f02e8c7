"""Weight averaging (EMA), adversarial weight perturbation (AWP) and N-FGSM against their formulas
computed here; resume with EMA is bit-identical; every new config field has a one-line error."""

import functools
import importlib
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from clead_jax import attacks
from clead_jax import config_checks
from clead_jax import input_pipeline
from clead_jax import losses
from clead_jax import methods
from clead_jax import parallel
from clead_jax import train
from clead_jax import train_state
from clead_jax import weight_perturbation
from clead_jax.errors import UserError
from tests.conftest import REPO, digits_config


def _leaves(tree):
  return [np.asarray(leaf, np.float64) for leaf in jax.tree.leaves(tree)]


@functools.lru_cache(maxsize=None)
def _dataset():
  return input_pipeline.load_dataset(digits_config().data)


def _setup(**overrides):
  config = digits_config(**{"attack.steps": 2, "train.schedule": "constant",
                            "train.learning_rate": 0.05, **overrides})
  config_checks.validate(config)
  dataset = _dataset()
  model = train_state.build(config, dataset)
  mesh = parallel.make_mesh()
  return config, dataset, model, mesh


def _batch(dataset, start=0, size=32):
  return {"image": dataset.train_images[start:start + size],
          "label": dataset.train_labels[start:start + size]}


def _step_fn(config, model, mesh, awp_start_step=0):
  ctx = methods.Context(model.network, config)
  return train.jit_train_step(train.make_train_step(ctx, methods.METHODS[config.method], model.tx,
                                                    model.schedule, awp_start_step), mesh)


# --- EMA ---------------------------------------------------------------------------------------

def test_ema_update_equals_its_closed_form_over_steps_with_warm_up():
  """After T updates the average is prod_t d_t * w_0 + sum_t (1 - d_t) prod_{s>t} d_s * w_{t+1},
  with d_t = min(decay, (1 + t) / (10 + t)): steps 0 and 1 are in the warm-up (0.1, 0.18), steps
  2 to 4 at the decay 0.25. Parameters and BatchNorm statistics alike."""
  decay, num_steps = 0.25, 5
  config, dataset, model, mesh = _setup(**{"method": "pgd_at", "train.ema_decay": decay})
  state = train_state.init_state(model, 0, mesh)
  assert isinstance(state, train_state.AveragedTrainState)
  step_fn = _step_fn(config, model, mesh)
  raw = [jax.device_get(state.variables)]
  for t in range(num_steps):
    state, _ = step_fn(state, _batch(dataset, 32 * t))
    raw.append(jax.device_get(state.variables))
  d = [min(decay, (1 + t) / (10 + t)) for t in range(num_steps)]
  assert d[0] < d[1] < d[2] == decay == d[4]  # the warm-up, then the decay itself
  weights = [np.prod(d)] + [(1 - d[t]) * np.prod(d[t + 1:]) for t in range(num_steps)]
  assert abs(sum(weights) - 1.0) < 1e-12
  expected = [sum(w * leaf for w, leaf in zip(weights, leaves))
              for leaves in zip(*[_leaves(v) for v in raw])]
  got = _leaves(jax.device_get(state.ema_variables))
  assert len(got) == len(expected) and any("batch_stats" in str(p) for p, _ in
                                           jax.tree_util.tree_leaves_with_path(raw[0]))
  for g, e in zip(got, expected):
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)
  # The average is not the last weights (the check above could fail).
  assert max(np.max(np.abs(g - r)) for g, r in zip(got, _leaves(raw[-1]))) > 1e-3


def test_ema_off_keeps_the_plain_state_and_the_raw_weights():
  config, _, model, mesh = _setup(**{"method": "pgd_at"})
  state = train_state.init_state(model, 0, mesh)
  assert type(state) is train_state.TrainState  # old checkpoints restore against it
  assert train_state.evaluated_weights(config) == "raw"
  config.eval.weights = "ema"
  with pytest.raises(UserError, match="config.train.ema_decay=0"):
    train_state.weights_of(state, train_state.evaluated_weights(config))


def _final_state(workdir):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                                  item_names=("state", "meta"))
  step = manager.latest_step()
  state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  manager.close()
  return step, state


@pytest.mark.slow  # real training, twice
def test_resume_with_ema_is_bit_identical_and_the_report_says_ema(tmp_path):
  """A run resumed from an earlier checkpoint ends with the same params, optimizer state and
  averages, bit for bit, as the uninterrupted run; its report measured the averaged weights."""
  overrides = {"method": "clead", "train.epochs": 2, "train.ema_decay": 0.9,
               "train.awp_gamma": 0.01, "train.awp_warmup_epochs": 1, "attack.name": "nfgsm",
               "train.checkpoint_every": 4, "train.keep_checkpoints": 10,
               "eval.attacks": "pgd20", "eval.curve_points": 0, "eval.num_examples": 40}
  whole = str(tmp_path / "whole")
  report = train.train_and_evaluate(digits_config(**overrides), whole)
  assert report["weights"] == "ema"
  assert json.load(open(os.path.join(whole, "report.json")))["weights"] == "ema"
  resumed = str(tmp_path / "resumed")
  shutil.copytree(whole, resumed)
  steps = sorted(int(s) for s in os.listdir(os.path.join(resumed, "checkpoints")) if s.isdigit())
  assert len(steps) > 2
  for step in steps[1:]:  # keep only the first checkpoint: training resumes from it
    shutil.rmtree(os.path.join(resumed, "checkpoints", str(step)))
  os.remove(os.path.join(resumed, "report.json"))
  again = train.train_and_evaluate(digits_config(**overrides), resumed)
  (step_a, a), (step_b, b) = _final_state(whole), _final_state(resumed)
  assert step_a == step_b == steps[-1]
  assert set(a) >= {"params", "opt_state", "ema_params", "ema_batch_stats"}
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert again["robust_accuracy"] == report["robust_accuracy"]
  assert again["clean_accuracy"] == report["clean_accuracy"]
  # Turning EMA off on resume is refused in one line (the state has other fields), and the
  # checkpoints are not taken for unreadable ones.
  kept = sorted(os.listdir(os.path.join(resumed, "checkpoints")))
  with pytest.raises(UserError) as error:
    train.train_and_evaluate(digits_config(**dict(overrides, **{"train.ema_decay": 0.0})), resumed)
  assert "config.train.ema_decay: checkpoint 0.9, now 0.0" in str(error.value)
  assert "\n" not in str(error.value)
  assert sorted(os.listdir(os.path.join(resumed, "checkpoints"))) == kept


# --- AWP ---------------------------------------------------------------------------------------

def test_awp_perturbs_each_kernel_by_gamma_times_its_norm_along_the_gradient():
  gamma = 0.02
  config, dataset, model, mesh = _setup(**{"method": "clead"})
  state = jax.device_get(train_state.init_state(model, 0, mesh))
  ctx = methods.Context(model.network, config)
  batch = _batch(dataset)
  x, y = input_pipeline.to_float(batch["image"]), batch["label"]
  loss_fn = lambda p: methods.clead_loss(ctx, p, state.batch_stats, x, x, y)
  delta = weight_perturbation.perturbation(loss_fn, state.params, gamma)
  grads = jax.grad(lambda p: loss_fn(p)[0])(state.params)
  kernels = 0
  for w, v, g in zip(_leaves(state.params), _leaves(delta), _leaves(grads)):
    if w.ndim > 1:
      kernels += 1
      np.testing.assert_allclose(np.linalg.norm(v), gamma * np.linalg.norm(w), rtol=1e-5)
      cosine = np.sum(v * g) / (np.linalg.norm(v) * np.linalg.norm(g))
      assert cosine > 1 - 1e-5  # uphill on the loss
    else:
      assert not np.any(v)  # biases, BatchNorm scales: not perturbed
  assert kernels >= 3


@pytest.mark.parametrize("method", ["pgd_at", "trades", "clead"])
def test_awp_update_is_the_perturbed_gradient_applied_at_the_unperturbed_weights(method):
  gamma = 0.05
  config, dataset, model, mesh = _setup(**{"method": method, "train.awp_gamma": gamma})
  state = jax.device_get(train_state.init_state(model, 0, mesh))
  batch = _batch(dataset)
  ctx = methods.Context(model.network, config)
  # The step's own adversarial examples: the key as train_step derives it, no augmentation.
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  _, attack_key = jax.random.split(key)
  x, y = input_pipeline.to_float(batch["image"]), jnp.asarray(batch["label"])
  m = methods.METHODS[method]
  x_adv = m.make_adversarial(ctx, state.params, state.batch_stats, x, y, attack_key)
  loss_fn = lambda p: m.loss(ctx, p, state.batch_stats, x, x_adv, y)
  grad_at = lambda p: jax.grad(lambda q: loss_fn(q)[0])(p)
  delta = weight_perturbation.layerwise_perturbation(state.params, grad_at(state.params), gamma)
  perturbed = jax.tree.map(lambda w, v: w + v, state.params, delta)
  updates, _ = model.tx.update(grad_at(perturbed), state.opt_state, state.params)
  expected = optax.apply_updates(state.params, updates)
  new_state, _ = _step_fn(config, model, mesh)(jax.device_put(state), batch)
  for got, want in zip(_leaves(new_state.params), _leaves(expected)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  # Neither the plain update nor one that kept the perturbation gives these weights.
  updates_plain, _ = model.tx.update(grad_at(state.params), state.opt_state, state.params)
  plain = optax.apply_updates(state.params, updates_plain)
  kept = optax.apply_updates(perturbed, updates)
  for other in (plain, kept):
    assert max(np.max(np.abs(g - o)) for g, o in zip(_leaves(new_state.params), _leaves(other))
               ) > 1e-4
  # During the warm-up (awp_start_step not reached) the step is the plain one.
  warm, _ = _step_fn(config, model, mesh, awp_start_step=1)(jax.device_put(state), batch)
  for got, want in zip(_leaves(warm.params), _leaves(plain)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


# --- N-FGSM ------------------------------------------------------------------------------------

@pytest.mark.parametrize("noise,step", [(2.0, 1.0), (3.0, 0.5)])
def test_nfgsm_is_its_formula_leaves_the_ball_and_stays_in_the_box(noise, step):
  """x0 = clip(x + U(-k eps, k eps)), x_adv = clip(x0 + alpha eps sign(grad CE(x0))), with no
  projection onto the epsilon-ball; through the registry, with the config's fields."""
  epsilon = 0.1
  config, dataset, model, mesh = _setup(**{"attack.name": "nfgsm", "attack.epsilon": epsilon,
                                           "attack.nfgsm_noise": noise,
                                           "attack.nfgsm_step": step})
  state = jax.device_get(train_state.init_state(model, 0, mesh))
  variables = state.variables
  x = jnp.asarray(input_pipeline.to_float(dataset.train_images[:48]))
  y = jnp.asarray(dataset.train_labels[:48])
  key = jax.random.key(7)
  apply_fn = lambda v, images: model.network.apply(v, images, train=False)
  x_adv = attacks.TRAIN_ATTACKS["nfgsm"](apply_fn, variables, x, y, key,
                                         attack_config=config.attack, init="uniform",
                                         objective=attacks.ce_objective)
  keys = jax.random.split(key, x.shape[0])
  u = np.stack([np.asarray(jax.random.uniform(k, x.shape[1:], jnp.float32, -noise * epsilon,
                                              noise * epsilon)) for k in keys])
  x0 = np.clip(np.asarray(x) + u, 0.0, 1.0)
  grad = jax.grad(lambda z: jnp.sum(losses.cross_entropy(apply_fn(variables, z)[0], y)))(
      jnp.asarray(x0))
  expected = np.clip(x0 + step * epsilon * np.sign(np.asarray(grad)), 0.0, 1.0)
  np.testing.assert_allclose(np.asarray(x_adv), expected, atol=1e-6)
  assert float(jnp.min(x_adv)) >= 0.0 and float(jnp.max(x_adv)) <= 1.0
  distance = np.max(np.abs(np.asarray(x_adv) - np.asarray(x)).reshape(len(x), -1), axis=1)
  formula = np.max(np.abs(expected - np.asarray(x)).reshape(len(x), -1), axis=1)
  outside = distance > epsilon + 1e-6
  np.testing.assert_array_equal(outside, formula > epsilon + 1e-6)
  assert outside.all()  # noise 2-3 eps: every example leaves the ball somewhere
  assert np.all(distance <= (noise + step) * epsilon + 1e-6)


def test_every_method_trains_with_nfgsm():
  for method in ("pgd_at", "trades", "clead"):
    config, dataset, model, mesh = _setup(**{"method": method, "attack.name": "nfgsm"})
    state = train_state.init_state(model, 0, mesh)
    state, metrics = _step_fn(config, model, mesh)(state, _batch(dataset))
    assert np.isfinite(float(metrics["loss"])) and int(state.step) == 1


# --- config ------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides,named", [
    ({"train.ema_decay": 1.0}, "config.train.ema_decay=1.0"),
    ({"train.ema_decay": -0.1}, "config.train.ema_decay=-0.1"),
    ({"train.awp_gamma": -0.01}, "config.train.awp_gamma"),
    ({"train.awp_warmup_epochs": -1}, "config.train.awp_warmup_epochs"),
    ({"train.awp_gamma": 0.01, "method": "standard"}, "config.train.awp_gamma=0.01"),
    ({"attack.nfgsm_noise": -1.0}, "config.attack.nfgsm_noise"),
    ({"attack.nfgsm_step": 0.0}, "config.attack.nfgsm_step"),
    ({"attack.name": "nfgsm", "attack.random_start": False}, "config.attack.name='nfgsm'"),
    ({"attack.name": "n_fgsm"}, "config.attack.name"),
    ({"eval.weights": "average"}, "config.eval.weights"),
    ({"eval.weights": "ema"}, "config.eval.weights='ema'"),
])
def test_bad_new_values_are_one_line_naming_the_field(overrides, named):
  with pytest.raises(UserError) as error:
    config_checks.validate(digits_config(**overrides))
  assert named in str(error.value) and "\n" not in str(error.value)


def test_fashion_mnist_recipes_are_valid_and_use_ema():
  module = importlib.import_module("configs.fashion_mnist")
  for variant in ("gpu", "cpu", "cpu_full", "published"):
    config = module.get_config(variant)
    config_checks.validate(config)
  assert module.get_config("gpu").train.ema_decay > 0
  full = module.get_config("cpu_full")
  assert full.train.ema_decay > 0 and full.data.train_size == -1
  assert full.data.validation_size == 5000 and full.eval.num_examples == -1


# --- data parallelism ------------------------------------------------------------------------------

FAKE_DEVICES = 4


def _lockstep(num_steps=4):
  """C-LEAD with EMA, AWP and N-FGSM on one device and, from the same state and batch, on all:
  per-step max |one - all| of the new state (averages included) and how far params moved."""
  from jax.sharding import Mesh  # pylint: disable=g-import-not-at-top
  config, dataset, model, _ = _setup(**{"method": "clead", "attack.name": "nfgsm",
                                        "train.ema_decay": 0.9, "train.awp_gamma": 0.02})
  meshes = {"one": Mesh(np.asarray(jax.devices()[:1]), ("data",)),
            "all": Mesh(np.asarray(jax.devices()), ("data",))}
  steps = {name: _step_fn(config, model, mesh) for name, mesh in meshes.items()}
  state = jax.device_get(train_state.init_state(model, 0, meshes["one"]))
  initial = state.params
  diffs = []
  for t in range(num_steps):
    new = {}
    for name, mesh in meshes.items():
      batch = jax.device_put(_batch(dataset, 32 * t), parallel.batch_sharding(mesh))
      new[name] = jax.device_get(steps[name](jax.device_put(state, parallel.replicated(mesh)),
                                             batch)[0])
    diffs.append(max(float(np.max(np.abs(a - b))) for a, b in
                     zip(_leaves(new["one"]), _leaves(new["all"]))))
    state = new["one"]
  moved = max(float(np.max(np.abs(a - b))) for a, b in zip(_leaves(state.params),
                                                            _leaves(initial)))
  return {"devices": jax.device_count(), "diffs": diffs, "moved": moved}


@pytest.mark.slow  # a real process
def test_ema_awp_and_nfgsm_steps_on_several_devices_equal_one_device(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={FAKE_DEVICES} "
                       "--xla_backend_optimization_level=0")
  out = tmp_path / "lockstep.json"
  proc = subprocess.run([sys.executable, "-m", "tests.test_recipes_ema_awp", str(out)], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  result = json.loads(out.read_text())
  assert result["devices"] == FAKE_DEVICES
  assert max(result["diffs"]) < 1e-4, result["diffs"]
  assert result["moved"] > 100 * 1e-4  # the comparison can fail


if __name__ == "__main__":
  with open(sys.argv[1], "w") as f:
    json.dump(_lockstep(), f)
