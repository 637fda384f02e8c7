"""Robust evaluation: clean accuracy, accuracy under each attack of the suite, AutoAttack, the
paper's transfer attack, the robustness curve and the checks, on the test split, sharded.

The model is evaluated in inference mode (BatchNorm running statistics), during the attack too,
and in float32 whatever config.model.dtype trains in: attack gradients in bfloat16 are too coarse
to trust. An example counts as robust to an attack only if it is classified correctly clean *and*
after the attack, for every attack. Each example's random start comes from (seed, its index in
the split), so results do not depend on the evaluation batch size or the device count.
"""

import dataclasses
import functools
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from clead_jax import attacks
from clead_jax import input_pipeline
from clead_jax import models
from clead_jax import parallel
from clead_jax import perturbation
from clead_jax import report as report_lib
from clead_jax.autoattack import versions as autoattack_versions
from clead_jax.errors import UserError
from clead_jax.evaluation import autoattack_runner
from clead_jax.evaluation import checks
from clead_jax.evaluation import indicators
from clead_jax.evaluation import sharded

AUTOATTACK_NAMES = autoattack_versions.ATTACK_NAMES
TRANSFER_ATTACKS = {"transfer_pgd3": attacks.transfer_pgd3}


def _autoattack_as_one_attack(version):
  """An AutoAttack version as one jittable attack (every stage on the whole batch): for the
  robustness curve and the benchmark. evaluate() runs the Runner instead."""
  def attack(apply_fn, variables, x, y, key, *, epsilon, norm):
    return autoattack_versions.autoattack(apply_fn, variables, x, y, key, epsilon=epsilon,
                                          norm=norm, version=version)
  return attack


# Every white-box evaluation attack by name: attack(apply_fn, variables, x, y, key, *, epsilon,
# norm) -> x_adv. The AutoAttack names run through the Runner in evaluate().
WHITE_BOX_ATTACKS = {**attacks.EVAL_ATTACKS,
                     **{name: _autoattack_as_one_attack(version)
                        for name, version in AUTOATTACK_NAMES.items()}}
ATTACK_NAMES = tuple(WHITE_BOX_ATTACKS) + tuple(TRANSFER_ATTACKS)


def parse_attack_names(names: str, field: str = "config.eval.attacks"):
  parsed = [n.strip() for n in names.split(",") if n.strip()]
  unknown = [n for n in parsed if n not in ATTACK_NAMES]
  if unknown:
    raise UserError(f"{field}: unknown attack(s) {unknown}; choose from {sorted(ATTACK_NAMES)}")
  if len(set(parsed)) != len(parsed):
    raise UserError(f"{field}={names!r} names an attack twice")
  return parsed


@dataclasses.dataclass
class Surrogate:
  """The network a transfer attack makes its points on: another run's model."""
  apply_fn: Callable  # (variables, x) -> (logits, embedding), inference mode
  variables: Any
  workdir: str


class Evaluator:
  """Compiles one function per attack and maps it over a split (evaluation/sharded.py).

  The model is `network` (a models.Network, applied in inference mode and in float32) or, with
  network=None, any `apply_fn(variables, x) -> (logits, embedding)` (the library's
  clead_jax.robustness.evaluate). `autoattack_settings` go to autoattack.versions.stages()
  (None: the reference's; smaller ones are reported as a warning).
  """

  def __init__(self, network, mesh, norm, batch_size, seed, *, apply_fn=None,
               autoattack_settings=None):
    if (network is None) == (apply_fn is None):
      raise ValueError("Evaluator takes a network or an apply_fn, not both or neither")
    self.network = None if network is None else models.in_float32(network)
    self._apply_fn = apply_fn
    self.mesh = mesh
    self.norm = norm
    self.seed = seed
    self.batch_size = sharded.round_up_to_devices(batch_size, mesh.devices.size)
    self.autoattack_settings = dict(autoattack_settings or {})
    self._compiled = {}

  def apply(self, variables, x):
    if self._apply_fn is not None:
      return self._apply_fn(variables, x)
    with models.evaluation_pooling():  # at trace time: the attacks' faster pooling on CPU
      return self.network.apply(variables, x, train=False)

  def _jit(self, fn, num_args):
    data = parallel.batch_sharding(self.mesh)
    return jax.jit(fn, in_shardings=(parallel.replicated(self.mesh), data, data, data)
                   + (None,) * num_args, out_shardings=data)

  def _correct_fn(self, attack_name):
    if attack_name not in self._compiled:
      attack = WHITE_BOX_ATTACKS.get(attack_name)
      norm = self.norm

      def correct(variables, images, labels, indices, epsilon):
        x = input_pipeline.to_float(images)
        logits, _ = self.apply(variables, x)
        clean_ok = jnp.argmax(logits, -1) == labels
        if attack is None:  # 'clean'
          return clean_ok
        keys = perturbation.example_keys(self.seed, indices)
        x_adv = attack(self.apply, variables, x, labels, keys, epsilon=epsilon, norm=norm)
        logits, _ = self.apply(variables, x_adv)
        return clean_ok & (jnp.argmax(logits, -1) == labels)

      self._compiled[attack_name] = self._jit(correct, 1)
    return self._compiled[attack_name]

  def _map(self, fn, images, labels, progress=None):
    """The Evaluator's batches: fixed size, in order (the last one padded)."""
    return sharded.map_examples(self.mesh, self.batch_size, fn, images, labels,
                                np.arange(len(labels)), size=self.batch_size,
                                length=self.batch_size, progress=progress)

  def correct(self, variables, images, labels, attack_name, epsilon, progress=False):
    """(n,) bool numpy array, on every process: example i is classified correctly clean and
    after the attack ('clean': no attack)."""
    fn = functools.partial(self._correct_fn(attack_name), variables)
    return self._map(lambda *batch: fn(*batch, jnp.float32(epsilon)), images, labels,
                     f"eval {attack_name}" if progress else None).astype(bool)

  def accuracy(self, variables, images, labels, attack_name, epsilon, progress=False):
    return float(np.mean(self.correct(variables, images, labels, attack_name, epsilon, progress)))

  def transfer_correct(self, variables, surrogate, images, labels, attack_name, epsilon,
                       progress=False):
    """Correct clean and on the points a transfer attack made on the surrogate."""
    key = ("transfer", attack_name, id(surrogate))
    if key not in self._compiled:
      attack, norm = TRANSFER_ATTACKS[attack_name], self.norm

      def correct(variables, images, labels, indices, surrogate_variables, epsilon):
        x = input_pipeline.to_float(images)
        clean_ok = jnp.argmax(self.apply(variables, x)[0], -1) == labels
        keys = perturbation.example_keys(self.seed, indices)
        x_adv = attack(surrogate.apply_fn, surrogate_variables, x, labels, keys,
                       epsilon=epsilon, norm=norm)
        return clean_ok & (jnp.argmax(self.apply(variables, x_adv)[0], -1) == labels)

      self._compiled[key] = self._jit(correct, 2)
    fn = functools.partial(self._compiled[key], variables)
    return self._map(lambda *batch: fn(*batch, surrogate.variables, jnp.float32(epsilon)),
                     images, labels, f"eval {attack_name}" if progress else None).astype(bool)

  def autoattack(self, variables, images, labels, epsilon, name="autoattack", progress=False,
                 state_path=None, identity=None):
    """autoattack_runner.Result (per-example flags after each stage) of a version by name."""
    if ("autoattack", name) not in self._compiled:
      self._compiled["autoattack", name] = autoattack_runner.Runner(
          self.apply, self.mesh, self.norm, self.batch_size, self.seed, name,
          **self.autoattack_settings)
    return self._compiled["autoattack", name].run(variables, images, labels, epsilon, progress,
                                                  state_path=state_path, identity=identity)

  def input_gradient_flags(self, variables, images, labels):
    """(zero, non_finite) per example: the clean input gradient of the cross-entropy."""
    if "input_gradient" not in self._compiled:
      self._compiled["input_gradient"] = self._jit(checks.input_gradient_fn(self.apply), 0)
    flags = self._map(functools.partial(self._compiled["input_gradient"], variables), images,
                      labels)
    return flags[:, 0], flags[:, 1]


def evaluate(evaluator, variables, images, labels, *, epsilon, attack_names, curve_points=0,
             curve_attack="pgd20", progress=False, report=None, surrogate=None,
             autoattack_state=None, autoattack_identity=None, with_indicators=True):
  """Runs the suite into `report` (a report.Report; written after every attack, so a stop keeps
  what finished); returns the report as a dict. The report's "warnings" (and, with
  `with_indicators`, its "indicators" block) come last: a report without them is of an
  evaluation that was stopped before its end.

  autoattack_state(name) -> the path where AutoAttack `name` saves its progress (None: not
  saved).
  """
  # The seconds of earlier, stopped calls on the same report count too (see report.Report).
  start = time.time() - (report.data.get("eval_time_s", 0.0) if report is not None else 0.0)
  if report is None:
    report = report_lib.Report(None, {"num_examples": int(len(labels))}, {}, is_writer=False)
  report.set(num_examples=int(len(labels)))
  clean = evaluator.correct(variables, images, labels, "clean", 0.0)
  report.add_clean(clean)
  autoattack_results = []
  for name in attack_names:
    attack_start = time.time()
    if name in AUTOATTACK_NAMES:  # one key per stage, and flags for the checks
      result = evaluator.autoattack(
          variables, images, labels, epsilon, name, progress,
          state_path=autoattack_state(name) if autoattack_state else None,
          identity=autoattack_identity)
      autoattack_results.append(result)
      report.add_attack(name, result.robust_after[-1], time.time() - attack_start,
                        stages={f"{name}/{stage}": flags
                                for stage, flags in zip(result.stage_names, result.robust_after)},
                        stage_times_s=None if result.stage_times_s is None else {
                            f"{name}/{stage}": t
                            for stage, t in zip(result.stage_names, result.stage_times_s)})
    elif name in TRANSFER_ATTACKS:
      if surrogate is None:
        raise UserError(f"{name} needs a surrogate: set --config.eval.surrogate to the workdir of "
                        "a standard run on the same data (the paper uses a non-robust network)")
      robust = evaluator.transfer_correct(variables, surrogate, images, labels, name, epsilon,
                                          progress)
      report.add_attack(name, robust, time.time() - attack_start,
                        transfer={"surrogate": surrogate.workdir,
                                  "protocol": "PGD-3, step 3/8 epsilon, no random start, on the "
                                              "surrogate; accuracy of this model on its points"})
    else:
      robust = evaluator.correct(variables, images, labels, name, epsilon, progress)
      report.add_attack(name, robust, time.time() - attack_start)
    report.set(eval_time_s=time.time() - start)
    report.write()
    if name in AUTOATTACK_NAMES and autoattack_state:
      autoattack_runner.discard_state(autoattack_state(name))
  # AutoAttack versions measured by an earlier, stopped call of this evaluation (the report
  # holds their stage flags): their black-box check is made here as well.
  autoattack_results += [
      autoattack_runner.result_from_flags(name, report.flags)
      for name in AUTOATTACK_NAMES
      if name in report.flags and name not in [r.name for r in autoattack_results]]
  if curve_points:
    epsilons = np.linspace(0.0, 2.0 * epsilon, curve_points)
    report.set(robustness_curve={
        "attack": curve_attack,
        "epsilon": [float(e) for e in epsilons],
        "accuracy": [evaluator.accuracy(variables, images, labels, curve_attack, float(e))
                     for e in tqdm(epsilons, desc="robustness curve", disable=not progress,
                                   leave=False)],
    })
  data = report.to_dict()
  white_box = {k: v for k, v in data["robust_accuracy"].items()
               if k.split("/")[0] not in data["transfer_attacks"]}
  report.set(warnings=(
      checks.settings_warnings(evaluator.autoattack_settings,
                               [r.name for r in autoattack_results])
      + checks.black_box_warnings(autoattack_results)
      + checks.monotonicity_warnings(white_box, data.get("robustness_curve"), len(labels))
      + checks.gradient_warnings(*evaluator.input_gradient_flags(variables, images, labels))),
      eval_time_s=time.time() - start)
  if with_indicators:  # (a continued report never carries an earlier call's indicators over)
    report.set(indicators=indicators.compute(evaluator, variables, images, labels,
                                             epsilon=epsilon, report=report),
               eval_time_s=time.time() - start)
  return report.write()
