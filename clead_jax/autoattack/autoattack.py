"""AutoAttack (Croce & Hein 2020): stages of complementary attacks, each run only on the points
that every earlier stage failed to fool; an example counts as robust if no stage fools it.

Versions, as fra31/auto-attack's AutoAttack.set_version:
  standard: APGD-CE; APGD-T (9 target classes); FAB-T (9 targets); Square (5,000 queries).
  plus:     APGD-CE and APGD-DLR with 5 restarts; FAB with 5 restarts; Square; APGD-T; FAB-T.
  rand:     APGD-CE and APGD-DLR with EoT over 20 samples, for randomised models.

Two ways to run a version:
  autoattack_flags / autoattack: one jittable function; every stage runs on the whole batch and
    an example keeps the first point that fooled it (masking), so the cost does not shrink as
    points are fooled. This is what attacks.EVAL_ATTACKS['autoattack'] calls.
  Runner: stage by stage over a whole split, gathering only the points still robust into
    batches sharded over all devices. Same per-example keys, hence the same results.
Example i's randomness comes from its own key (folded with the stage and the run), so results do
not depend on the batch an example is evaluated in.
"""

import dataclasses
import functools
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from clead_jax import input_pipeline
from clead_jax import parallel
from clead_jax.autoattack import apgd
from clead_jax.autoattack import common
from clead_jax.autoattack import fab
from clead_jax.autoattack import square

VERSIONS = ("standard", "plus", "rand")
# Names in attacks.EVAL_ATTACKS and in the report -> version.
ATTACK_NAMES = {"autoattack": "standard", "autoattack_plus": "plus", "autoattack_rand": "rand"}
N_RESTARTS_PLUS = 5  # autoattack.py, version 'plus': apgd.n_restarts = fab.n_restarts = 5


@dataclasses.dataclass(frozen=True)
class Stage:
  """One attack of a version: `num_runs` runs (restarts x targets) of `run`."""
  name: str  # the report key's suffix: autoattack/<name>
  run: Callable  # run(apply_fn, variables, x, y, keys, run_index) -> x_adv
  num_runs: int
  black_box: bool = False


def stages(version, num_classes, *, epsilon, norm, n_iter=apgd.N_ITER, fab_iter=fab.N_ITER,
           n_queries=square.N_QUERIES, n_target_classes=apgd.N_TARGET_CLASSES,
           n_restarts_plus=N_RESTARTS_PLUS, eot_iter=apgd.EOT_ITER, stochastic=False):
  """The stages of a version. The keyword defaults are the reference's; tests shrink them."""
  if version not in VERSIONS:
    raise ValueError(f"version={version!r}; choose one of {VERSIONS}")
  common.check_norm(norm)
  targets = min(n_target_classes, num_classes - 1)
  kw = dict(epsilon=epsilon, norm=norm)

  def apgd_stage(name, loss, targeted=False, restarts=1, eot=1):
    apgd.check_classes(num_classes, loss, targeted)
    return Stage(name, apgd.make_run(loss=loss, targeted=targeted, n_restarts=restarts,
                                     n_iter=n_iter, eot_iter=eot, stochastic=stochastic, **kw),
                 restarts * (targets if targeted else 1))

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
  return common.fold_in(example_keys, stage_index)


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
  keys, check_keys = common.split_keys(common.per_example_keys(key, x.shape[0]), 2)
  predict_fn = common.predictor(apply_fn, variables, check_keys if stochastic else None)
  x_adv, robust = x, predict_fn(x) == y
  robust_after, robust_alone = [], []
  for index, stage in enumerate(stages(version, num_classes, epsilon=epsilon, norm=norm,
                                       **settings)):
    run = lambda x_in, y_in, run_keys, r, stage=stage: stage.run(apply_fn, variables, x_in, y_in,
                                                                 run_keys, r)
    x_stage, robust_stage = common.over_runs(run, stage.num_runs, predict_fn, x, y,
                                             stage_keys(keys, index))
    x_adv = jnp.where(common.expand(robust, x), x_stage, x_adv)
    robust = robust & robust_stage
    robust_after.append(robust)
    robust_alone.append(robust_stage)
  return Flags(common.finish(x_adv, x, epsilon, norm), jnp.stack(robust_after),
               jnp.stack(robust_alone))


def autoattack(apply_fn, variables, x, y, key, *, epsilon, norm, version="standard", **settings):
  """AutoAttack as one attack: x_adv is the first point that fooled each example."""
  return autoattack_flags(apply_fn, variables, x, y, key, epsilon=epsilon, norm=norm,
                          version=version, **settings).x_adv


# --- the Runner: stage by stage, on the points still robust, sharded ---------------------------

@dataclasses.dataclass
class Result:
  """Per-example outcome of one AutoAttack version over a split."""
  name: str  # autoattack, autoattack_plus or autoattack_rand
  stage_names: list
  black_box: list  # per stage
  clean: np.ndarray  # (n,) bool: classified correctly
  robust_after: np.ndarray  # (num_stages, n) bool: still robust after each stage
  time_s: float

  def accuracies(self):
    """Report keys: the final robust accuracy and the accuracy after each stage."""
    n = len(self.clean)
    result = {self.name: float(np.sum(self.robust_after[-1])) / n}
    for stage_name, robust in zip(self.stage_names, self.robust_after):
      result[f"{self.name}/{stage_name}"] = float(np.sum(robust)) / n
    return result


def _bucket(count, batch_size, devices):
  """The padded size of a batch of `count` examples: a multiple of an eighth of batch_size (and
  of the device count), so that few shapes, hence few compilations, occur."""
  granule = -(-batch_size // (8 * devices)) * devices
  return min(-(-count // granule) * granule, batch_size)


def _chunk_length(count, batch_size):
  """Examples per batch when `count` examples are split evenly into batches of <= batch_size."""
  return -(-count // max(1, -(-count // batch_size)))


def map_examples(mesh, batch_size, fn, images, labels, indices, *args, size=None):
  """fn(images, labels, indices, *args) -> per-example array, over `indices` of a split.

  `indices` are global example indices, split evenly into batches of at most batch_size (a
  multiple of the device count), each padded to `size` (default: a bucket size) and sharded over
  the mesh. Returns a numpy array on every process.
  """
  if not len(indices):
    return np.zeros((0,), bool)
  sharding = parallel.batch_sharding(mesh)
  devices = mesh.devices.size
  process_index, process_count = jax.process_index(), jax.process_count()
  length = _chunk_length(len(indices), batch_size)
  size = size or _bucket(length, batch_size, devices)
  outputs = []
  for start in range(0, len(indices), length):
    chunk = indices[start:start + length]
    padded = np.concatenate([chunk, np.full(size - len(chunk), chunk[0], chunk.dtype)])
    host = input_pipeline.local_batch(images, labels, padded, process_index, process_count)
    host["indices"] = padded.reshape(process_count, -1)[process_index].astype(np.int32)
    batch = {k: jax.make_array_from_process_local_data(sharding, v) for k, v in host.items()}
    out = fn(batch["image"], batch["label"], batch["indices"], *args)
    if process_count > 1:
      out = multihost_utils.process_allgather(out, tiled=True)
    outputs.append(np.asarray(out)[:len(chunk)])
  return np.concatenate(outputs)


class Runner:
  """Runs one AutoAttack version over a split with the evaluator's mesh, batch size and seed.

  Example i's key is fold_in(key(seed), i), as in evaluation.Evaluator, so the Runner and
  attacks.EVAL_ATTACKS['autoattack'] under the Evaluator give the same per-example results.
  apply_fn(variables, x) -> (logits, embedding) must be deterministic.
  """

  def __init__(self, apply_fn, mesh, norm, batch_size, seed, name="autoattack",
               compiler_options=None, **settings):
    self.apply_fn = apply_fn
    self.compiler_options = compiler_options
    self.mesh = mesh
    self.norm = norm
    self.seed = seed
    self.name = name
    self.version = ATTACK_NAMES[name]
    self.settings = settings
    devices = mesh.devices.size
    self.batch_size = -(-batch_size // devices) * devices
    self._compiled = {}

  def _jit(self, fn):
    data = parallel.batch_sharding(self.mesh)
    return jax.jit(fn, in_shardings=(parallel.replicated(self.mesh), data, data, data, None, None),
                   out_shardings=data, compiler_options=self.compiler_options)

  def _example_keys(self, indices):
    base = jax.random.key(self.seed)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(indices)

  def _clean_fn(self):
    if "clean" not in self._compiled:
      def correct(variables, images, labels, indices, epsilon, run_index):
        del indices, epsilon, run_index
        logits, _ = self.apply_fn(variables, input_pipeline.to_float(images))
        return jnp.argmax(logits, -1) == labels
      self._compiled["clean"] = self._jit(correct)
    return self._compiled["clean"]

  def _stage_fn(self, index, num_classes):
    """correct(variables, images, labels, indices, epsilon, run_index): run `run_index` of the
    stage, then whether the model still classifies the result correctly."""
    if (index, num_classes) not in self._compiled:
      apply_fn = self.apply_fn

      def correct(variables, images, labels, indices, epsilon, run_index):
        x = input_pipeline.to_float(images)
        # The same keys as autoattack_flags: (example keys -> split -> stage -> run).
        keys, _ = common.split_keys(self._example_keys(indices), 2)
        keys = common.fold_in(stage_keys(keys, index), run_index)
        # The stage is rebuilt under the trace so that epsilon can be traced.
        traced = stages(self.version, num_classes, epsilon=epsilon, norm=self.norm,
                        **self.settings)[index]
        x_adv = traced.run(apply_fn, variables, x, labels, keys, run_index)
        logits, _ = apply_fn(variables, x_adv)
        return jnp.argmax(logits, -1) == labels

      self._compiled[index, num_classes] = self._jit(correct)
    return self._compiled[index, num_classes]

  def run(self, variables, images, labels, epsilon, progress=False) -> Result:
    """Clean accuracy, then each stage's runs on the examples still robust."""
    start_time = time.time()
    n = len(labels)
    epsilon = jnp.float32(epsilon)
    num_classes = common.num_classes_of(self.apply_fn, variables,
                                      input_pipeline.to_float(jnp.asarray(images[:1])))
    stage_list = stages(self.version, num_classes, epsilon=float(epsilon), norm=self.norm,
                        **self.settings)
    run_map = functools.partial(map_examples, self.mesh, self.batch_size)
    robust = run_map(functools.partial(self._clean_fn(), variables), images, labels,
                     np.arange(n), epsilon, jnp.int32(0)).astype(bool)
    clean = robust.copy()
    robust_after = []
    for index, stage in enumerate(stage_list):
      fn = functools.partial(self._stage_fn(index, num_classes), variables)
      bar = tqdm(total=stage.num_runs, desc=f"{self.name}/{stage.name}", disable=not progress,
                 leave=False)
      size = None  # batches keep their padded size while at least half of it is used
      for run_index in range(stage.num_runs):
        todo = np.flatnonzero(robust)
        if len(todo):
          length = _chunk_length(len(todo), self.batch_size)
          if size is None or not size // 2 < length <= size:
            size = _bucket(length, self.batch_size, self.mesh.devices.size)
          robust[todo] = run_map(fn, images, labels, todo, epsilon, jnp.int32(run_index),
                                 size=size).astype(bool)
        bar.update(1)
        bar.set_postfix(robust=f"{int(robust.sum())}/{n}")
      bar.close()
      robust_after.append(robust.copy())
    return Result(self.name, [s.name for s in stage_list], [s.black_box for s in stage_list],
                  clean, np.stack(robust_after), time.time() - start_time)
