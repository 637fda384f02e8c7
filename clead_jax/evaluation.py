"""Robust evaluation: clean accuracy, accuracy under each attack of the suite, and the
robustness curve, on the test split, sharded over all devices.

The model is evaluated in inference mode (BatchNorm running statistics), during the attack too.
Each example's random start comes from (seed, its index in the split), so results do not depend
on the evaluation batch size or the device count.
"""

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from clead_jax import attacks
from clead_jax import input_pipeline
from clead_jax import parallel
from clead_jax.autoattack import autoattack as autoattack_lib
from clead_jax.autoattack import checks
from clead_jax.errors import UserError


def parse_attack_names(names: str, field: str = "config.eval.attacks"):
  parsed = [n.strip() for n in names.split(",") if n.strip()]
  known = set(attacks.EVAL_ATTACKS) | set(autoattack_lib.ATTACK_NAMES)  # + autoattack versions
  unknown = [n for n in parsed if n not in known]
  if unknown:
    raise UserError(f"{field}: unknown attack(s) {unknown}; choose from {sorted(known)}")
  return parsed


class Evaluator:
  """Compiles one function per attack and runs it over a split, batch by batch."""

  def __init__(self, network, mesh, norm, batch_size, seed):
    self.network = network
    self.mesh = mesh
    self.norm = norm
    self.seed = seed
    devices = jax.device_count()
    self.batch_size = -(-batch_size // devices) * devices  # round up to a multiple of devices
    self._compiled = {}

  def _apply(self, variables, x):
    return self.network.apply(variables, x, train=False)

  def _correct_fn(self, attack_name):
    if attack_name not in self._compiled:
      attack = attacks.EVAL_ATTACKS.get(attack_name)
      norm = self.norm

      def correct(variables, images, labels, indices, epsilon):
        x = input_pipeline.to_float(images)
        if attack is not None:
          base = jax.random.key(self.seed)
          keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(indices)
          x = attack(self._apply, variables, x, labels, keys, epsilon=epsilon, norm=norm)
        logits, _ = self._apply(variables, x)
        return jnp.argmax(logits, -1) == labels

      data = parallel.batch_sharding(self.mesh)
      self._compiled[attack_name] = jax.jit(
          correct, in_shardings=(parallel.replicated(self.mesh), data, data, data, None),
          out_shardings=data)
    return self._compiled[attack_name]

  def correct(self, variables, images, labels, attack_name, epsilon, progress=False):
    """(n,) bool numpy array, on every process: example i is classified correctly after the
    attack ('clean': no attack)."""
    fn = self._correct_fn(attack_name)
    n = len(labels)
    sharding = parallel.batch_sharding(self.mesh)
    process_index, process_count = jax.process_index(), jax.process_count()
    flags = []
    starts = range(0, n, self.batch_size)
    for start in tqdm(starts, desc=f"eval {attack_name}", disable=not progress, leave=False):
      indices = np.arange(start, start + self.batch_size)
      valid = indices < n
      indices = np.where(valid, indices, 0)  # pad the last batch with example 0
      host = input_pipeline.local_batch(images, labels, indices, process_index, process_count)
      host["indices"] = indices.reshape(process_count, -1)[process_index].astype(np.int32)
      batch = {k: jax.make_array_from_process_local_data(sharding, v) for k, v in host.items()}
      ok = fn(variables, batch["image"], batch["label"], batch["indices"], jnp.float32(epsilon))
      if process_count > 1:
        ok = multihost_utils.process_allgather(ok, tiled=True)
      flags.append(np.asarray(ok)[valid])
    return np.concatenate(flags)

  def accuracy(self, variables, images, labels, attack_name, epsilon, progress=False):
    """Fraction of examples classified correctly after the attack ('clean': no attack)."""
    return float(np.mean(self.correct(variables, images, labels, attack_name, epsilon,
                                      progress)))

  # AutoAttack (clead_jax/autoattack): stage by stage, on the points still robust.
  def autoattack(self, variables, images, labels, epsilon, name="autoattack", progress=False):
    """autoattack.Result (per-example flags after each stage) of an AutoAttack version by name."""
    if ("autoattack", name) not in self._compiled:
      self._compiled["autoattack", name] = autoattack_lib.Runner(
          self._apply, self.mesh, self.norm, self.batch_size, self.seed, name)
    return self._compiled["autoattack", name].run(variables, images, labels, epsilon, progress)

  def input_gradient_flags(self, variables, images, labels):
    """(zero, non_finite) per example: the clean input gradient of the cross-entropy."""
    if "input_gradient" not in self._compiled:
      data = parallel.batch_sharding(self.mesh)
      self._compiled["input_gradient"] = jax.jit(
          checks.input_gradient_fn(self._apply),
          in_shardings=(parallel.replicated(self.mesh), data, data, data), out_shardings=data)
    flags = autoattack_lib.map_examples(
        self.mesh, self.batch_size, functools.partial(self._compiled["input_gradient"], variables),
        images, labels, np.arange(len(labels)))
    return flags[:, 0], flags[:, 1]


def evaluate(evaluator, variables, images, labels, *, epsilon, attack_names, curve_points=0,
             curve_attack="pgd20", progress=False):
  """Runs the suite; returns the report's accuracy fields and the robustness curve."""
  start = time.time()
  clean = evaluator.correct(variables, images, labels, "clean", 0.0)
  result = {"num_examples": int(len(labels)), "clean_accuracy": float(np.mean(clean))}
  result["robust_accuracy"], autoattack_results = {}, []
  # Wall seconds of each attack over the split, its compilation included when it is the first use.
  result["attack_time_s"] = {}
  robust_to_all = clean.copy()  # per example: no attack so far has fooled it
  for name in attack_names:
    attack_start = time.time()
    if name in autoattack_lib.ATTACK_NAMES:  # one key per stage, and flags for the checks
      autoattack_results.append(
          evaluator.autoattack(variables, images, labels, epsilon, name, progress))
      result["robust_accuracy"].update(autoattack_results[-1].accuracies())
      robust = autoattack_results[-1].robust_after[-1]
    else:
      robust = evaluator.correct(variables, images, labels, name, epsilon, progress)
      result["robust_accuracy"][name] = float(np.mean(robust))
    robust_to_all &= robust
    result["attack_time_s"][name] = time.time() - attack_start
  if attack_names:
    # A point counts only if it is classified correctly clean and after every attack: the
    # per-example worst case, which can be lower than every attack's own accuracy.
    result["worst_case_accuracy"] = float(np.mean(robust_to_all))
  if curve_points:
    epsilons = np.linspace(0.0, 2.0 * epsilon, curve_points)
    result["robustness_curve"] = {
        "attack": curve_attack,
        "epsilon": [float(e) for e in epsilons],
        "accuracy": [evaluator.accuracy(variables, images, labels, curve_attack, float(e))
                     for e in tqdm(epsilons, desc="robustness curve", disable=not progress,
                                   leave=False)],
    }
  result["warnings"] = (
      checks.black_box_warnings(autoattack_results)
      + checks.monotonicity_warnings(result["robust_accuracy"], result.get("robustness_curve"),
                                     len(labels))
      + checks.gradient_warnings(*evaluator.input_gradient_flags(variables, images, labels)))
  result["eval_time_s"] = time.time() - start
  return result
