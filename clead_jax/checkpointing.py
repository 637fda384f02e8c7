"""Orbax checkpoints of everything that decides the rest of a run.

A checkpoint holds the train state (params, batch_stats, opt_state, step, PRNG key) and, as JSON,
the config and the data iterator's position. The batch order is a function of (seed, step), so
the position is the step; it is stored explicitly so that a reader can check it.

Saves are asynchronous and atomic: Orbax writes into a temporary directory and renames it when the
save is complete, so a run killed mid-save leaves the previous checkpoint as the latest. A
finalised checkpoint that cannot be read is moved aside (never deleted) and the previous one used.
"""

import os
import time

import jax
import orbax.checkpoint as ocp
from absl import logging

from clead_jax import config_tools
from clead_jax import default_config
from clead_jax.errors import UserError

# Config fields that may differ when a run resumes: they change neither the model, nor the data,
# nor the optimisation.
RESUMABLE_FIELDS = (
    "train.log_every", "train.checkpoint_every", "train.keep_checkpoints", "train.eval_every",
    "data.data_dir", "data.download", "compilation_cache_dir", "eval.",
)


def config_mismatches(stored: dict, current: dict):
  """Fields, other than RESUMABLE_FIELDS, whose values differ: [(field, stored, current)].

  A field that the stored config lacks (one added to clead_jax after that checkpoint was
  written) matches when the current value is the field's default, which keeps the old behaviour.
  """
  defaults = config_tools.flatten(default_config.get_base_config().to_dict())
  stored, current = config_tools.flatten(stored), config_tools.flatten(current)
  differ = []
  for field in sorted(set(stored) | set(current)):
    if any(field == f or (f.endswith(".") and field.startswith(f)) for f in RESUMABLE_FIELDS):
      continue
    if field not in stored and field in defaults and current.get(field) == defaults[field]:
      continue
    a, b = stored.get(field), current.get(field)
    if isinstance(a, list):
      a = tuple(a)
    if isinstance(b, list):
      b = tuple(b)
    if a != b:
      differ.append((field, a, b))
  return differ


class Checkpointer:
  """DIR/checkpoints keeps the last `keep` checkpoints; DIR/best_checkpoint the best by a metric."""

  def __init__(self, workdir: str, keep: int, best_metric: str = "pgd20_accuracy"):
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, "checkpoints")
    self.best_directory = os.path.join(self.workdir, "best_checkpoint")
    self.best_metric = best_metric
    self.manager = self._manager(self.directory, ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True))
    self._best = None
    self._saving = None  # the step of the last save started

  @staticmethod
  def _manager(directory, options):
    return ocp.CheckpointManager(directory, options=options, item_names=("state", "meta"))

  def _best_manager(self):
    if self._best is None:
      self._best = self._manager(self.best_directory, ocp.CheckpointManagerOptions(
          max_to_keep=1, create=True, best_fn=lambda m: m[self.best_metric], best_mode="max"))
    return self._best

  def latest_step(self):
    return self.manager.latest_step()

  def all_steps(self):
    return sorted(self.manager.all_steps())

  def best_steps(self):
    """The step kept in DIR/best_checkpoint (empty unless training evaluated with eval_every)."""
    if not os.path.isdir(self.best_directory):
      return []
    return sorted(self._best_manager().all_steps())

  def _failed(self, step, error):
    lines = [l.strip() for l in str(error).splitlines() if l.strip()]
    cause = lines[-1] if lines else type(error).__name__
    if "No space left" in str(error):
      cause = "no space left on device"
    steps = [s for s in self.all_steps() if s != step]
    return UserError(
        f"saving checkpoint {step} into {self.directory} failed ({cause[:160]}); free disk space "
        f"or choose another --workdir, then rerun to resume from step "
        f"{steps[-1] if steps else 0} (earlier checkpoints {steps} are intact)")

  def save(self, step: int, state, meta: dict, metrics: dict | None = None, best=False):
    manager = self._best_manager() if best else self.manager
    self.wait()  # the save in flight first: its failure names its own step, not this one
    try:
      manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), metrics=metrics)
      self._saving = step
    except Exception as e:  # pylint: disable=broad-except
      raise self._failed(step, e) from e

  def wait(self):
    for manager in (self.manager, self._best):
      if manager is None:
        continue
      try:
        manager.wait_until_finished()
      except Exception as e:  # pylint: disable=broad-except
        raise self._failed(self._saving, e) from e

  def read_meta(self, step, best=False):
    manager = self._best_manager() if best else self.manager
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, abstract_state, step=None, best=False):
    """(state, meta) of `step`, default the latest; raises UserError naming the problem."""
    manager = self._best_manager() if best else self.manager
    step = manager.latest_step() if step is None else step
    steps = sorted(manager.all_steps())
    if step not in steps:
      raise UserError(f"--checkpoint={step}: no such checkpoint in {manager.directory}; "
                      f"available steps: {steps}")
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]

  def restore_latest_good(self, abstract_state, config_dict=None):
    """The newest checkpoint that can be read, moving unreadable ones aside; (None, None) if
    none. When every checkpoint was unreadable, says so: the run starts from step 0."""
    set_aside = []
    steps = self.all_steps()
    for index in reversed(range(len(steps))):
      step, earlier = steps[index], index > 0
      try:
        meta = self.read_meta(step)
      except Exception as e:  # pylint: disable=broad-except
        set_aside.append(self._set_aside(step, e, earlier))
        continue
      check_same_model(meta, abstract_state, self.directory, step, config_dict)
      # Before the restore: a config whose state has other fields (train.ema_decay turned on or
      # off) would not restore, and its checkpoint must not be taken for an unreadable one.
      check_same_config(meta, config_dict, self.workdir)
      try:
        return self.restore(abstract_state, step)
      except Exception as e:  # pylint: disable=broad-except
        set_aside.append(self._set_aside(step, e, earlier))
    if set_aside and jax.process_index() == 0:
      print(f"warning: no checkpoint in {self.directory} could be read (moved aside: "
            f"{', '.join(set_aside)}); training starts again from step 0", flush=True)
    return None, None

  def _set_aside(self, step, error, earlier=True):
    """Moves an unreadable checkpoint to checkpoints/corrupt-<step>-<time>; deletes nothing."""
    source = os.path.join(self.directory, str(step))
    target = os.path.join(self.directory, f"corrupt-{step}-{int(time.time())}")
    message = (f"checkpoint {source} cannot be read ({type(error).__name__}: "
               f"{_first_line(error)}); moved to {target}, "
               + ("falling back to the previous one" if earlier else "no earlier checkpoint"))
    if jax.process_index() == 0:
      print(f"warning: {message}", flush=True)
      os.replace(source, target)
    if jax.process_count() > 1:
      # The other processes must not list the checkpoints before process 0 has moved this one.
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f"clead_jax set aside checkpoint {step}")
    self.manager.reload()
    return os.path.basename(target)

  def close(self):
    """Waits for the saves in flight, then releases the managers."""
    for manager in (self.manager, self._best):
      if manager is not None:
        try:
          manager.close()
        except Exception as e:  # pylint: disable=broad-except
          # Already reported by save() or wait(); the run is stopping either way.
          logging.warning("closing the checkpoint manager: %s", e)


def param_shapes(params):
  """{'backbone/Conv_0/kernel': [3, 3, 1, 16], ...}: what tells one model from another."""
  return {"/".join(str(getattr(k, "key", k)) for k in path): list(leaf.shape)
          for path, leaf in jax.tree_util.tree_leaves_with_path(params)}


def _first_line(error):
  """The first readable line of an error, without pybind's C++ tail."""
  lines = [l.strip() for l in str(error).splitlines() if l.strip()]
  return (lines[0] if lines else type(error).__name__).split(" [")[0][:160]


def check_same_model(meta, abstract_state, directory, step, config_dict=None):
  """A checkpoint of another model (parameter names or shapes differ) is refused with one line
  that names the config fields responsible (model.*, data.name) when they differ."""
  stored = meta.get("param_shapes")
  if stored is None:
    return
  want = param_shapes(abstract_state.params)
  differ = sorted(k for k in set(stored) | set(want) if stored.get(k) != want.get(k))
  if not differ:
    return
  fields = ""
  if config_dict is not None and "config" in meta:
    before, now = config_tools.flatten(meta["config"]), config_tools.flatten(config_dict)
    changed = [f"config.{f}: checkpoint {before.get(f)!r}, now {now.get(f)!r}"
               for f in sorted(set(before) | set(now))
               if (f.startswith("model.") or f == "data.name") and before.get(f) != now.get(f)]
    if changed:
      fields = "; it differs in " + ", ".join(changed[:3])
  raise UserError(f"checkpoint {directory}/{step} is of a different model (parameters differ: "
                  f"{', '.join(differ[:3])}{', ...' if len(differ) > 3 else ''}){fields}; use "
                  "the config it was trained with, or another --workdir")


def check_same_config(meta, config_dict, workdir):
  """A checkpoint of a config that differs in a field that changes the run (config_mismatches)
  is refused with one line naming the fields."""
  if config_dict is None or "config" not in meta:
    return
  differ = config_mismatches(meta["config"], config_dict)
  if differ:
    raise UserError(
        f"the config differs from the one {workdir} was trained with in " + "; ".join(
            f"config.{f}: checkpoint {a!r}, now {b!r}" for f, a, b in differ[:4])
        + "; use the same values to resume, or another --workdir for a new run")


def restore_params(workdir: str, abstract_params):
  """Params and batch_stats of another run's latest checkpoint (config.train.init_from)."""
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  if not os.path.isdir(directory):
    raise UserError(f"config.train.init_from={workdir!r} holds no checkpoint under {directory}; "
                    "point it at the workdir of a finished run")
  manager = ocp.CheckpointManager(directory, item_names=("state", "meta"))
  step = manager.latest_step()
  if step is None:
    raise UserError(f"config.train.init_from={workdir!r} holds no checkpoint under {directory}; "
                    "point it at the workdir of a finished run")
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  manager.close()
  state = restored["state"]
  if param_shapes(state["params"]) != param_shapes(abstract_params):
    raise UserError(f"config.train.init_from={workdir!r}: its checkpoint is of a different model; "
                    "use a run with the same config.model and dataset")
  return state["params"], state["batch_stats"]

