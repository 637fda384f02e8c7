"""Workdirs as training leaves them, made without training: config.json and one checkpoint of a
small CNN whose weights are random numbers from numpy (initialising through Flax compiles for
many seconds on a CPU). Different seeds give different models of the same config."""

import json
import os

import jax
import numpy as np


def random_weights_workdir(workdir, config, seed=0, step=5, best_step=None):
  """Writes DIR/config.json and a checkpoint at `step` (and, with `best_step`, the same weights
  as best_checkpoint/ at that step); returns the workdir."""
  # pylint: disable=g-import-not-at-top
  from clead_jax import checkpointing
  from clead_jax import input_pipeline
  from clead_jax import train_state
  dataset = input_pipeline.load_dataset(config.data)
  model = train_state.build(config, dataset)
  tx = model.tx
  abstract = jax.eval_shape(
      lambda: train_state.create_train_state(model.network, tx, dataset.image_shape, config.seed))
  rng = np.random.default_rng(seed)

  def init(path, a):  # He-normal kernels, unit BatchNorm scales and variances, zero biases
    name = str(getattr(path[-1], "key", path[-1]))
    if name == "kernel":
      return (rng.normal(size=a.shape) * np.sqrt(2.0 / np.prod(a.shape[:-1]))).astype(a.dtype)
    return (np.ones if name in ("scale", "var") else np.zeros)(a.shape, a.dtype)

  params = jax.tree_util.tree_map_with_path(init, abstract.params)
  state = abstract.replace(
      step=np.int32(step), params=params,
      batch_stats=jax.tree_util.tree_map_with_path(init, abstract.batch_stats),
      opt_state=jax.tree.map(np.asarray, tx.init(params)),
      rng=np.zeros(abstract.rng.shape, abstract.rng.dtype))
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(sort_keys=True, indent=2) + "\n")
  meta = {"config": json.loads(config.to_json_best_effort()),
          "param_shapes": checkpointing.param_shapes(state.params)}
  checkpointer = checkpointing.Checkpointer(workdir, 3)
  checkpointer.save(step, state, meta)
  if best_step is not None:
    checkpointer.save(best_step, state.replace(step=np.int32(best_step)), meta,
                      metrics={"pgd20_accuracy": 0.5}, best=True)
  checkpointer.close()
  return workdir
