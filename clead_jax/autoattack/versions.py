"""AutoAttack (Croce & Hein 2020): stages of complementary attacks, each run only on the points
that every earlier stage failed to fool; an example counts as robust if no stage fools it.

Versions, as fra31/auto-attack's AutoAttack.set_version:
  standard: APGD-CE; APGD-T (9 target classes); FAB-T (9 targets); Square (5,000 queries).
  plus:     APGD-CE and APGD-DLR with 5 restarts; FAB with 5 restarts; Square; APGD-T; FAB-T.
  rand:     APGD-CE and APGD-DLR with EoT over 20 samples, for randomised models.

Two ways to run a version:
  autoattack_flags / autoattack (here): one jittable function; every stage runs on the whole
    batch and an example keeps the first point that fooled it (masking), so the cost does not
    shrink as points are fooled. The benchmark and the robustness curve use it.
  clead_jax/evaluation/autoattack_runner.py: stage by stage over a whole split, gathering only
    the points still robust into batches sharded over all devices, resumable. Same per-example
    keys, hence the same results.
Example i's randomness comes from its own key (folded with the stage and the run), so results do
not depend on the batch an example is evaluated in.
"""

import dataclasses
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from clead_jax import perturbation
from clead_jax.autoattack import apgd
from clead_jax.autoattack import common
from clead_jax.autoattack import fab
from clead_jax.autoattack import square

VERSIONS = ("standard", "plus", "rand")
# Evaluation attack names (config.eval.attacks, report keys) -> version.
ATTACK_NAMES = {"autoattack": "standard", "autoattack_plus": "plus", "autoattack_rand": "rand"}
N_RESTARTS_PLUS = 5  # autoattack.py, version 'plus': apgd.n_restarts = fab.n_restarts = 5


@dataclasses.dataclass(frozen=True)
class Stage:
  """One attack of a version: `num_runs` runs (restarts x targets) of `run`."""
  name: str  # the report key's suffix: autoattack/<name>
  run: Callable  # run(apply_fn, variables, x, y, keys, run_index) -> x_adv
  num_runs: int
  black_box: bool = False
  # APGD stages: the same run returning (x_adv, perturbation.Trace), for the indicators of
  # attack failure (clead_jax/evaluation/indicators.py).
  traced_run: Callable = None


def stages(version, num_classes, *, epsilon, norm, n_iter=apgd.N_ITER, fab_iter=fab.N_ITER,
           n_queries=square.N_QUERIES, n_target_classes=apgd.N_TARGET_CLASSES,
           n_restarts_plus=N_RESTARTS_PLUS, eot_iter=apgd.EOT_ITER, stochastic=False):
  """The stages of a version. The keyword defaults are the reference's; tests shrink them."""
  if version not in VERSIONS:
    raise ValueError(f"version={version!r}; choose one of {VERSIONS}")
  perturbation.check_norm(norm)
  targets = min(n_target_classes, num_classes - 1)
  kw = dict(epsilon=epsilon, norm=norm)

  def apgd_stage(name, loss, targeted=False, restarts=1, eot=1):
    apgd.check_classes(num_classes, loss, targeted)
    make_run = functools.partial(apgd.make_run, loss=loss, targeted=targeted, n_restarts=restarts,
                                 n_iter=n_iter, eot_iter=eot, stochastic=stochastic, **kw)
    return Stage(name, make_run(), restarts * (targets if targeted else 1),
                 traced_run=make_run(trace=True))

  def fab_stage(name, targeted, restarts=1):
    return Stage(name, fab.make_run(targeted=targeted, n_restarts=restarts, n_iter=fab_iter,
                                    **kw), restarts * (targets if targeted else 1))

  square_stage = Stage("square", square.make_run(n_queries=n_queries, **kw), 1, black_box=True)
  if version == "standard":
    return [apgd_stage("apgd_ce", "ce"), apgd_stage("apgd_t", "dlr", targeted=True),
            fab_stage("fab_t", targeted=True), square_stage]
  if version == "plus":
    return [apgd_stage("apgd_ce", "ce", restarts=n_restarts_plus),
            apgd_stage("apgd_dlr", "dlr", restarts=n_restarts_plus),
            fab_stage("fab", targeted=False, restarts=n_restarts_plus), square_stage,
            apgd_stage("apgd_t", "dlr", targeted=True), fab_stage("fab_t", targeted=True)]
  return [apgd_stage("apgd_ce", "ce", eot=eot_iter), apgd_stage("apgd_dlr", "dlr", eot=eot_iter)]


def stage_keys(example_keys, stage_index):
  return perturbation.fold_in(example_keys, stage_index)


class Flags(NamedTuple):
  """What autoattack_flags returns."""
  x_adv: jax.Array  # per example, the first point that fooled it (else the last stage's point)
  robust_after: jax.Array  # (num_stages, B): still robust after stages 0..s
  robust_alone: jax.Array  # (num_stages, B): stage s alone did not fool the example


def autoattack_flags(apply_fn, variables, x, y, key, *, epsilon, norm, version="standard",
                     **settings) -> Flags:
  """AutoAttack with per-stage flags. Jittable; every stage runs on the whole batch (see the
  module docstring), which also gives each stage's result on its own. `settings` go to stages();
  a stochastic model is judged on one fixed sample per example.
  """
  stochastic = settings.get("stochastic", False)
  num_classes = common.num_classes_of(apply_fn, variables, x, stochastic)
  keys, check_keys = perturbation.split_keys(perturbation.per_example_keys(key, x.shape[0]), 2)
  predict_fn = common.predictor(apply_fn, variables, check_keys if stochastic else None)
  x_adv, robust = x, predict_fn(x) == y
  robust_after, robust_alone = [], []
  for index, stage in enumerate(stages(version, num_classes, epsilon=epsilon, norm=norm,
                                       **settings)):
    run = lambda x_in, y_in, run_keys, r, stage=stage: stage.run(apply_fn, variables, x_in, y_in,
                                                                 run_keys, r)
    x_stage, robust_stage = common.over_runs(run, stage.num_runs, predict_fn, x, y,
                                             stage_keys(keys, index))
    x_adv = jnp.where(perturbation.expand(robust, x), x_stage, x_adv)
    robust = robust & robust_stage
    robust_after.append(robust)
    robust_alone.append(robust_stage)
  return Flags(perturbation.finish(x_adv, x, epsilon, norm), jnp.stack(robust_after),
               jnp.stack(robust_alone))


def autoattack(apply_fn, variables, x, y, key, *, epsilon, norm, version="standard", **settings):
  """AutoAttack as one attack: x_adv is the first point that fooled each example."""
  return autoattack_flags(apply_fn, variables, x, y, key, epsilon=epsilon, norm=norm,
                          version=version, **settings).x_adv
