"""What a run is made of, before any step: the network, the schedule and the optimizer of a
config, and the train state (its initial value and its abstract shapes).

With weight averaging on (train.ema_decay > 0) the state is an AveragedTrainState: it also holds
the exponential moving average of the parameters and of the BatchNorm statistics, so checkpoints
hold both. With it off the state is the plain TrainState, so checkpoints written before weight
averaging existed restore unchanged. `evaluated_weights` and `weights_of` say which of the two
evaluation, best-checkpoint selection and export use (config.eval.weights).

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


@flax.struct.dataclass
class AveragedTrainState(TrainState):
  """A TrainState with the exponential moving average of its params and batch_stats."""
  ema_params: Any
  ema_batch_stats: Any

  @property
  def ema_variables(self):
    return {"params": self.ema_params, "batch_stats": self.ema_batch_stats}


def ema_decay_at(step, ema_decay):
  """The decay of the update after `step` updates: min(ema_decay, (1 + step) / (10 + step)), so
  that the average forgets its random initialisation quickly early in training."""
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(jnp.float32(ema_decay), (1.0 + step) / (10.0 + step))


def update_ema(state, params, batch_stats, ema_decay):
  """The state's averages moved towards the new params and batch_stats; the decay is that of
  state.step, the number of updates before this one. A plain TrainState is returned as is."""
  if not isinstance(state, AveragedTrainState):
    return state
  decay = ema_decay_at(state.step, ema_decay)
  average = lambda old, new: decay * old + (1.0 - decay) * new
  return state.replace(ema_params=jax.tree.map(average, state.ema_params, params),
                       ema_batch_stats=jax.tree.map(average, state.ema_batch_stats, batch_stats))


WEIGHTS = ("auto", "ema", "raw")


def evaluated_weights(config) -> str:
  """'ema' or 'raw': the weights config.eval.weights names ('auto': the averaged ones when
  train.ema_decay > 0). A config from before the field existed has no EMA: 'raw'."""
  weights = config.eval.get("weights", "auto")
  if weights == "auto":
    return "ema" if config.train.get("ema_decay", 0.0) > 0 else "raw"
  return weights


def weights_of(state, weights: str):
  """The variables ({'params', 'batch_stats'}) of `state` that `weights` ('ema', 'raw') names."""
  if weights == "ema":
    if not isinstance(state, AveragedTrainState):
      raise UserError("config.eval.weights='ema' names the averaged weights, but this run holds "
                      "none (config.train.ema_decay=0); use config.eval.weights=raw or auto")
    return state.ema_variables
  return state.variables


@dataclasses.dataclass(frozen=True)
class Model:
  """A config's network and optimisation, for a dataset."""
  network: Any
  schedule: Any
  tx: Any
  steps_per_epoch: int
  total_steps: int
  image_shape: tuple
  ema: bool = False  # whether the state holds averaged weights (train.ema_decay > 0)


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
               tuple(dataset.image_shape), ema=config.train.get("ema_decay", 0.0) > 0)


def create_train_state(network, tx, image_shape, seed, ema=False):
  """Initial state (the averages, with `ema`, start at the initial weights). Pure, so that
  jax.eval_shape gives its shapes without allocating."""
  key = jax.random.PRNGKey(seed)
  init_key, train_key = jax.random.split(key)
  variables = network.init(init_key, jnp.zeros((2,) + tuple(image_shape), jnp.float32), train=False)
  params, batch_stats = variables["params"], variables.get("batch_stats", {})
  fields = dict(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                opt_state=tx.init(params), rng=train_key)
  if ema:
    return AveragedTrainState(**fields, ema_params=params, ema_batch_stats=batch_stats)
  return TrainState(**fields)


def with_weights(state, params, batch_stats, tx):
  """`state` restarted from other weights (config.train.init_from): a fresh optimizer state,
  and the averages, if any, start at those weights."""
  state = state.replace(params=params, batch_stats=batch_stats, opt_state=tx.init(params))
  if isinstance(state, AveragedTrainState):
    state = state.replace(ema_params=params, ema_batch_stats=batch_stats)
  return state


def init_state(model: Model, seed, mesh):
  """The initial state, made directly on the devices, replicated."""
  init = lambda: create_train_state(model.network, model.tx, model.image_shape, seed, model.ema)
  return jax.jit(init, out_shardings=parallel.replicated(mesh))()


def abstract_state(model: Model, seed, mesh):
  """The state's shapes and shardings, from eval_shape: nothing is allocated."""
  replicated = parallel.replicated(mesh)
  shapes = jax.eval_shape(
      lambda: create_train_state(model.network, model.tx, model.image_shape, seed, model.ema))
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                      shapes)
