"""Orbax checkpoints of the whole train state: params, batch_stats, opt_state, step and PRNG key.

The data order is a function of (seed, step), so the step is the data iterator's position.
Each checkpoint also stores the config as JSON.
"""

import os

import jax
import orbax.checkpoint as ocp

from clead_jax.errors import UserError


class Checkpointer:
  """One CheckpointManager under DIR/checkpoints keeping the last `keep` checkpoints."""

  def __init__(self, workdir: str, keep: int):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        item_names=("state", "config"))

  def latest_step(self):
    return self.manager.latest_step()

  def all_steps(self):
    return list(self.manager.all_steps())

  def save(self, step: int, state, config_json: str):
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), config=ocp.args.JsonSave({"config": config_json})))

  def restore(self, abstract_state, step=None):
    step = self.latest_step() if step is None else step
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))
    return restored["state"]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


def restore_params(workdir: str, abstract_params, abstract_batch_stats):
  """Params and batch_stats of another run's latest checkpoint (config.train.init_from)."""
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  manager = ocp.CheckpointManager(directory, item_names=("state", "config"))
  step = manager.latest_step()
  if step is None:
    raise UserError(f"config.train.init_from={workdir!r} holds no checkpoint under {directory}; "
                    "point it at the workdir of a finished run")
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  state = restored["state"]
  manager.close()
  ok = (jax.tree.structure(state["params"]) == jax.tree.structure(abstract_params) and
        all(a.shape == b.shape for a, b in zip(jax.tree.leaves(state["params"]),
                                               jax.tree.leaves(abstract_params))))
  if not ok:
    raise UserError(f"config.train.init_from={workdir!r}: its checkpoint is of a different model; "
                    "use a run with the same config.model and dataset")
  return state["params"], state["batch_stats"]
