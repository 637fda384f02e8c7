"""The trainer: train_and_evaluate(config, workdir).

Sections, in order: setup (mesh, batch sizes), input, model and optimizer, checkpoint and
resume, the update step, the loop (logging, checkpoints, evaluations), final evaluation.
"""

import json
import os
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from tqdm import tqdm

from clead_jax import checkpointing
from clead_jax import config_checks
from clead_jax import evaluation
from clead_jax import input_pipeline
from clead_jax import metric_logging
from clead_jax import models
from clead_jax import objectives
from clead_jax import parallel
from clead_jax import report as report_lib
from clead_jax.errors import UserError


@flax.struct.dataclass
class TrainState:
  step: jnp.ndarray
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jnp.ndarray  # raw uint32 key data, so that checkpoints hold plain arrays


# --- model and optimizer ---------------------------------------------------------------------------

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


def create_train_state(network, tx, image_shape, seed):
  """Initial state. Pure, so that jax.eval_shape gives its shapes without allocating."""
  key = jax.random.PRNGKey(seed)
  init_key, train_key = jax.random.split(key)
  variables = network.init(init_key, jnp.zeros((2,) + tuple(image_shape), jnp.float32), train=False)
  params, batch_stats = variables["params"], variables.get("batch_stats", {})
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                    opt_state=tx.init(params), rng=train_key)


def init_state(network, tx, image_shape, seed, mesh):
  """The initial state, made directly on the devices, replicated."""
  init = lambda: create_train_state(network, tx, image_shape, seed)
  return jax.jit(init, out_shardings=parallel.replicated(mesh))()


def build(config, dataset):
  """The network, schedule and optimizer for a config and its dataset."""
  network = models.build_network(config.model, dataset.num_classes, dataset.mean, dataset.std)
  per_epoch = input_pipeline.steps_per_epoch(len(dataset.train_labels), config.train.batch_size)
  if per_epoch == 0:
    raise UserError(f"config.train.batch_size={config.train.batch_size} exceeds the "
                    f"{len(dataset.train_labels)} training examples; lower it")
  total_steps = config.train.epochs * per_epoch
  schedule = make_schedule(config.train, total_steps, per_epoch)
  return network, schedule, make_optimizer(config.train, schedule), per_epoch, total_steps


# --- the update step ------------------------------------------------------------------------------

def make_train_step(ctx, method, tx, schedule):
  """train_step(state, batch) -> (state, metrics) for one method; pure, to be jitted."""

  def train_step(state, batch):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    augment_key, attack_key = jax.random.split(key)
    x = input_pipeline.to_float(batch["image"])
    if ctx.config.data.augment:
      x = input_pipeline.augment(x, augment_key)
    y = batch["label"]
    x_adv = x
    if method.make_adversarial is not None:
      x_adv = method.make_adversarial(ctx, state.params, state.batch_stats, x, y, attack_key)

    def loss_fn(params):
      return method.loss(ctx, params, state.batch_stats, x, x_adv, y)

    (loss, (batch_stats, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads),
                   learning_rate=schedule(state.step))
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state)
    return new_state, metrics

  return train_step


def jit_train_step(train_step, mesh):
  replicated = parallel.replicated(mesh)
  return jax.jit(train_step, in_shardings=(replicated, parallel.batch_sharding(mesh)),
                 out_shardings=(replicated, replicated), donate_argnums=(0,))


def _all_finite(tree):
  return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


# --- the whole run --------------------------------------------------------------------------------

def train_and_evaluate(config, workdir: str) -> dict:
  """Trains config.method, evaluates it, writes DIR/report.*; resumes from DIR's checkpoints."""
  config_checks.validate(config)
  is_writer = jax.process_index() == 0

  # Setup: the mesh and the batch sizes.
  mesh = parallel.make_mesh()
  per_device = parallel.check_global_batch(config.train.batch_size)
  if is_writer:
    print(f"clead_jax: {jax.process_count()} process(es), {jax.device_count()} device(s) "
          f"({jax.devices()[0].platform}); global batch {config.train.batch_size}, "
          f"per-device batch {per_device}", flush=True)

  # Input.
  dataset = input_pipeline.load_dataset(config.data)
  network, schedule, tx, per_epoch, total_steps = build(config, dataset)
  pretrain_steps = config.train.pretrain_epochs * per_epoch

  # Model, optimizer and state, replicated over the mesh.
  replicated = parallel.replicated(mesh)
  init = lambda: create_train_state(network, tx, dataset.image_shape, config.seed)
  abstract_state = jax.eval_shape(init)
  abstract_state = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), abstract_state)

  # Checkpoint and resume.
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise UserError(f"--workdir {workdir!r} cannot be created ({e.strerror}); "
                    "choose a writable directory") from e
  checkpointer = checkpointing.Checkpointer(workdir, config.train.keep_checkpoints)
  config_json = config.to_json_best_effort(sort_keys=True)
  if checkpointer.latest_step() is not None:
    state = checkpointer.restore(abstract_state)
    if is_writer:
      print(f"clead_jax: resuming from step {int(state.step)} in {checkpointer.directory}",
            flush=True)
  else:
    state = init_state(network, tx, dataset.image_shape, config.seed, mesh)
    if config.train.init_from:
      params, batch_stats = checkpointing.restore_params(
          config.train.init_from, abstract_state.params, abstract_state.batch_stats)
      state = state.replace(params=jax.device_put(params, replicated),
                            batch_stats=jax.device_put(batch_stats, replicated),
                            opt_state=jax.jit(tx.init, out_shardings=replicated)(params))
  if is_writer:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config_json + "\n")

  # The update steps: clean pretraining, then the method.
  steps = {}
  for name in {"standard" if pretrain_steps else config.method, config.method}:
    ctx = objectives.Context(network, config)
    steps[name] = jit_train_step(make_train_step(ctx, objectives.METHODS[name], tx, schedule), mesh)

  evaluator = evaluation.Evaluator(network, mesh, config.attack.norm, config.eval.batch_size,
                                   config.seed)
  writer = metric_logging.MetricWriter(workdir, enabled=is_writer)
  start_step = int(state.step)
  batches = input_pipeline.train_batches(dataset, config.train.batch_size, config.seed,
                                         start_step, parallel.batch_sharding(mesh))
  eval_steps = config.train.eval_every * per_epoch

  # The loop.
  train_start = time.time()
  log_start, log_step, pending = time.time(), start_step, []
  progress = tqdm(total=total_steps, initial=start_step, disable=not is_writer, desc="train",
                  dynamic_ncols=True)
  for step in range(start_step, total_steps):
    method = "standard" if step < pretrain_steps else config.method
    state, metrics = steps[method](state, next(batches))
    pending.append(metrics)
    done = step + 1
    if done % config.train.log_every == 0 or done == total_steps:
      # Keys differ across the switch from clean pretraining to the method.
      keys = sorted({k for m in pending for k in m})
      means = {k: float(np.mean([float(m[k]) for m in pending if k in m])) for k in keys}
      if not np.isfinite(means["loss"]):
        raise UserError(f"non-finite loss at step {done}: " + ", ".join(
            f"{k}={v:.4g}" for k, v in means.items()) + f"; the last good checkpoint "
            f"(step {checkpointer.latest_step()}) is kept; lower config.train.learning_rate")
      elapsed = time.time() - log_start
      means["images_per_s"] = (done - log_step) * config.train.batch_size / max(elapsed, 1e-9)
      means["epoch"] = done / per_epoch
      writer.write(done, means)
      progress.set_postfix({k: f"{means[k]:.3f}" for k in
                            ("loss", "clean_accuracy", "adv_accuracy") if k in means})
      log_start, log_step, pending = time.time(), done, []
    if done % config.train.checkpoint_every == 0 or done == total_steps:
      if not _all_finite(state.params):
        raise UserError(f"non-finite parameters at step {done}; the last good checkpoint (step "
                        f"{checkpointer.latest_step()}) is kept; lower config.train.learning_rate")
      checkpointer.save(done, state, config_json)
    if eval_steps and done % eval_steps == 0 and done != total_steps:
      n = config.eval.during_train_examples
      partial = evaluation.evaluate(
          evaluator, {"params": state.params, "batch_stats": state.batch_stats},
          dataset.test_images[:n], dataset.test_labels[:n], epsilon=config.attack.epsilon,
          attack_names=["pgd20"])
      writer.write(done, {"eval/clean_accuracy": partial["clean_accuracy"],
                          "eval/pgd20_accuracy": partial["robust_accuracy"]["pgd20"]})
    progress.update(1)
  progress.close()
  checkpointer.wait()
  train_time = time.time() - train_start

  # Final evaluation and the report.
  result = final_evaluation(config, evaluator, state, dataset, progress=is_writer)
  report = {"method": config.method, "dataset": config.data.name, "model": config.model.name,
            "norm": config.attack.norm, "epsilon": float(config.attack.epsilon),
            **result, "steps": int(state.step), "train_time_s": train_time}
  if is_writer:
    report_lib.write_report(workdir, report)
    print(report_lib.to_markdown(report), flush=True)
  writer.close()
  checkpointer.close()
  return report


def final_evaluation(config, evaluator, state, dataset, progress=False):
  n = config.eval.num_examples if config.eval.num_examples > 0 else len(dataset.test_labels)
  return evaluation.evaluate(
      evaluator, {"params": state.params, "batch_stats": state.batch_stats},
      dataset.test_images[:n], dataset.test_labels[:n], epsilon=config.attack.epsilon,
      attack_names=evaluation.parse_attack_names(config.eval.attacks),
      curve_points=config.eval.curve_points, curve_attack=config.eval.curve_attack,
      progress=progress)
