"""What a run is made of, before any step: the network, the schedule and the optimizer of a
config, and the train state (its initial value and its abstract shapes).

Both training (train.py) and evaluation (evaluation/workdir.py) build a run's model from here, so
a checkpoint restores against the same abstract state in both.
"""

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from clead_jax import input_pipeline
from clead_jax import models
from clead_jax import parallel
from clead_jax.errors import UserError


@flax.struct.dataclass
class TrainState:
  step: jnp.ndarray
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jnp.ndarray  # raw uint32 key data, so that checkpoints hold plain arrays

  @property
  def variables(self):
    return {"params": self.params, "batch_stats": self.batch_stats}


@dataclasses.dataclass(frozen=True)
class Model:
  """A config's network and optimisation, for a dataset."""
  network: Any
  schedule: Any
  tx: Any
  steps_per_epoch: int
  total_steps: int
  image_shape: tuple


def make_schedule(train_config, total_steps, steps_per_epoch):
  lr = train_config.learning_rate
  if train_config.schedule == "constant":
    return optax.constant_schedule(lr)
  if train_config.schedule == "piecewise":
    boundaries = {int(b * total_steps): 0.1 for b in train_config.piecewise_boundaries}
    return optax.piecewise_constant_schedule(lr, boundaries)
  warmup = min(train_config.warmup_epochs * steps_per_epoch, total_steps - 1)
  return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, total_steps, end_value=0.0)


def make_optimizer(train_config, schedule):
  if train_config.optimizer == "adam":
    return optax.adamw(schedule, weight_decay=train_config.weight_decay)
  return optax.chain(
      optax.add_decayed_weights(train_config.weight_decay),
      optax.sgd(schedule, momentum=train_config.momentum, nesterov=train_config.nesterov))


def build(config, dataset) -> Model:
  """The network, schedule and optimizer for a config and its dataset."""
  network = models.build_network(config.model, dataset.num_classes, dataset.mean, dataset.std)
  per_epoch = input_pipeline.steps_per_epoch(len(dataset.train_labels), config.train.batch_size)
  if per_epoch == 0:
    raise UserError(f"config.train.batch_size={config.train.batch_size} exceeds the "
                    f"{len(dataset.train_labels)} training examples; lower it")
  total_steps = config.train.epochs * per_epoch
  schedule = make_schedule(config.train, total_steps, per_epoch)
  return Model(network, schedule, make_optimizer(config.train, schedule), per_epoch, total_steps,
               tuple(dataset.image_shape))


def create_train_state(network, tx, image_shape, seed):
  """Initial state. Pure, so that jax.eval_shape gives its shapes without allocating."""
  key = jax.random.PRNGKey(seed)
  init_key, train_key = jax.random.split(key)
  variables = network.init(init_key, jnp.zeros((2,) + tuple(image_shape), jnp.float32), train=False)
  params, batch_stats = variables["params"], variables.get("batch_stats", {})
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                    opt_state=tx.init(params), rng=train_key)


def init_state(model: Model, seed, mesh):
  """The initial state, made directly on the devices, replicated."""
  init = lambda: create_train_state(model.network, model.tx, model.image_shape, seed)
  return jax.jit(init, out_shardings=parallel.replicated(mesh))()


def abstract_state(model: Model, seed, mesh):
  """The state's shapes and shardings, from eval_shape: nothing is allocated."""
  replicated = parallel.replicated(mesh)
  shapes = jax.eval_shape(
      lambda: create_train_state(model.network, model.tx, model.image_shape, seed))
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                      shapes)
