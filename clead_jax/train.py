"""The trainer: train_and_evaluate(config, workdir).

Sections, in order: setup (mesh, batch sizes), input, model and optimizer, checkpoint and
resume, the update step, the loop (logging, checkpoints, evaluations), final evaluation.
"""

import contextlib
import json
import os
import signal
import threading
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
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


@jax.jit
def _all_finite(tree):
  return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def compile_step(jitted_step, state, batch_shape, image_dtype, mesh):
  """Compiles ahead of time, so that the compile time is measured on its own."""
  data = parallel.batch_sharding(mesh)
  batch = {"image": jax.ShapeDtypeStruct(batch_shape, image_dtype, sharding=data),
           "label": jax.ShapeDtypeStruct(batch_shape[:1], jnp.int32, sharding=data)}
  start = time.time()
  compiled = jitted_step.lower(state, batch).compile()
  return compiled, time.time() - start


def enable_compilation_cache(directory: str):
  """JAX's persistent compilation cache: a resumed run reuses the compiled steps."""
  if not directory:
    return
  jax.config.update("jax_compilation_cache_dir", os.path.expanduser(directory))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


class StopRequest:
  """SIGTERM/SIGINT ask the loop to checkpoint at the next step boundary and exit cleanly."""

  def __init__(self):
    self.signal_name = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.signal_name = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def requested(self, step):
    """Whether to stop after `step`. With several processes, the answer is the same on all of
    them: each step they share their flags (one small all-gather), so a signal that reaches one
    process, or reaches them at different steps, stops them all after the same step instead of
    leaving the others waiting in a collective. JAX's preemption sync point is asked too, for
    preemption notices that come through its coordination service."""
    local = self.signal_name is not None
    if jax.process_count() == 1:
      return local
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    flags = multihost_utils.process_allgather(np.array([local]))
    return bool(np.any(flags)) or multihost_utils.reached_preemption_sync_point(step)


def _truncate_metrics(workdir, step):
  """On resume, drops metric lines logged after the checkpoint: they will be logged again."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return
  with open(path) as f:
    kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
  with open(path + ".tmp", "w") as f:
    f.writelines(kept)
  os.replace(path + ".tmp", path)


@contextlib.contextmanager
def _closing(progress):
  """Closes the progress bar before an error is printed, so the error starts its own line."""
  try:
    yield
  finally:
    progress.close()


def _prepare_workdir(workdir):
  try:
    os.makedirs(workdir, exist_ok=True)
    # One probe file per process: processes share the workdir.
    probe = os.path.join(workdir, f".write_test.{jax.process_index()}.{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise UserError(f"--workdir {workdir!r} is not a writable directory ({e.strerror}); "
                    "choose a directory you can write to") from e


# --- the whole run --------------------------------------------------------------------------------

def train_and_evaluate(config, workdir: str) -> dict:
  """Trains config.method, evaluates it, writes DIR/report.*; resumes from DIR's checkpoints.

  Returns the report, or {"stopped_at": step} when SIGTERM/SIGINT stopped the run.
  """
  config_checks.validate(config)
  is_writer = jax.process_index() == 0
  enable_compilation_cache(config.compilation_cache_dir)

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

  # Model and optimizer state: shapes from eval_shape, arrays made on the devices.
  replicated = parallel.replicated(mesh)
  abstract_state = jax.eval_shape(
      lambda: create_train_state(network, tx, dataset.image_shape, config.seed))
  abstract_state = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), abstract_state)

  # Checkpoint and resume.
  _prepare_workdir(workdir)
  checkpointer = checkpointing.Checkpointer(workdir, config.train.keep_checkpoints)
  with contextlib.ExitStack() as cleanup:
    cleanup.callback(checkpointer.close)  # waits for saves in flight, also on an error
    config_dict = json.loads(config.to_json_best_effort())
    state, meta = checkpointer.restore_latest_good(abstract_state)
    if state is not None:
      differ = checkpointing.config_mismatches(meta["config"], config_dict)
      if differ:
        raise UserError(
            f"the config differs from the one {workdir} was trained with in " + "; ".join(
                f"config.{f}: checkpoint {a!r}, now {b!r}" for f, a, b in differ[:4])
            + "; use the same values to resume, or another --workdir for a new run")
      if is_writer:
        print(f"clead_jax: resuming from step {int(state.step)} in {checkpointer.directory}",
              flush=True)
        _truncate_metrics(workdir, int(state.step))
    else:
      state = init_state(network, tx, dataset.image_shape, config.seed, mesh)
      if config.train.init_from:
        params, batch_stats = checkpointing.restore_params(config.train.init_from,
                                                           abstract_state.params)
        state = state.replace(params=jax.device_put(params, replicated),
                              batch_stats=jax.device_put(batch_stats, replicated),
                              opt_state=jax.jit(tx.init, out_shardings=replicated)(params))
    if is_writer:
      with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(sort_keys=True, indent=2) + "\n")
    shapes = checkpointing.param_shapes(abstract_state.params)

    def save(step, best_metrics=None):
      meta = {"config": config_dict, "param_shapes": shapes,
              "data": {"seed": config.seed, "next_step": step, "epoch": step // per_epoch,
                       "batch_in_epoch": step % per_epoch}}
      checkpointer.save(step, state, meta, metrics=best_metrics, best=best_metrics is not None)

    # The update steps, compiled ahead of time: clean pretraining, then the method.
    steps, compile_s = {}, {}
    batch_shape = (config.train.batch_size,) + tuple(dataset.image_shape)
    for name in sorted({"standard" if pretrain_steps else config.method, config.method}):
      ctx = objectives.Context(network, config)
      jitted = jit_train_step(make_train_step(ctx, objectives.METHODS[name], tx, schedule), mesh)
      steps[name], compile_s[name] = compile_step(jitted, state, batch_shape,
                                                  dataset.train_images.dtype, mesh)
    if is_writer:
      print("clead_jax: compiled train step in " + ", ".join(
          f"{k}: {v:.1f} s" for k, v in compile_s.items()), flush=True)

    evaluator = evaluation.Evaluator(network, mesh, config.attack.norm, config.eval.batch_size,
                                     config.seed)
    writer = metric_logging.MetricWriter(workdir, enabled=is_writer)
    cleanup.callback(writer.close)
    start_step = int(state.step)
    batches = input_pipeline.train_batches(dataset, config.train.batch_size, config.seed,
                                           start_step, parallel.batch_sharding(mesh))
    eval_steps = config.train.eval_every * per_epoch

    # The loop. Metrics stay on the device until a log or checkpoint step needs them.
    train_start = time.time()
    log_start, log_step, pending = time.time(), start_step, []
    progress = tqdm(total=total_steps, initial=start_step, disable=not is_writer, desc="train",
                    dynamic_ncols=True)
    with StopRequest() as stop, _closing(progress):
      for step in range(start_step, total_steps):
        method = "standard" if step < pretrain_steps else config.method
        state, metrics = steps[method](state, next(batches))
        pending.append(metrics)
        done = step + 1
        stopping = stop.requested(done)
        is_log = done % config.train.log_every == 0 or done == total_steps
        is_checkpoint = done % config.train.checkpoint_every == 0 or done == total_steps or stopping
        if is_log or is_checkpoint:
          pending = [jax.device_get(m) for m in pending]
          for offset, m in enumerate(pending):
            if not np.isfinite(m["loss"]):
              raise UserError(
                  f"non-finite loss at step {done - len(pending) + offset + 1}: " + ", ".join(
                      f"{k}={float(v):.4g}" for k, v in sorted(m.items()))
                  + f"; stopped, the last good checkpoint (step {checkpointer.latest_step()}) is "
                  "kept; lower config.train.learning_rate or check the data")
        if is_log:
          keys = sorted({k for m in pending for k in m})  # keys change when pretraining ends
          means = {k: float(np.mean([m[k] for m in pending if k in m])) for k in keys}
          means["images_per_s"] = ((done - log_step) * config.train.batch_size
                                   / max(time.time() - log_start, 1e-9))
          means["epoch"] = done / per_epoch
          writer.write(done, means)
          progress.set_postfix({k: f"{means[k]:.3f}" for k in
                                ("loss", "clean_accuracy", "adv_accuracy") if k in means})
          log_start, log_step, pending = time.time(), done, []
        if is_checkpoint:
          if not _all_finite(state.params):
            raise UserError(f"non-finite parameters after step {done}; stopped, the last good "
                            f"checkpoint (step {checkpointer.latest_step()}) is kept; lower "
                            "config.train.learning_rate")
          save(done)
        progress.update(1)
        if stopping:
          checkpointer.wait()
          progress.close()
          if is_writer:
            print(f"clead_jax: stopped by {stop.signal_name or 'preemption'} at step {done}; "
                  f"checkpoint saved in {checkpointer.directory}/{done}; run the same command to "
                  "resume", flush=True)
          return {"stopped_at": done}
        if eval_steps and done % eval_steps == 0 and done != total_steps:
          n = config.eval.during_train_examples
          partial = evaluation.evaluate(
              evaluator, {"params": state.params, "batch_stats": state.batch_stats},
              dataset.test_images[:n], dataset.test_labels[:n], epsilon=config.attack.epsilon,
              attack_names=["pgd20"])
          during = {"clean_accuracy": partial["clean_accuracy"],
                    "pgd20_accuracy": partial["robust_accuracy"]["pgd20"]}
          writer.write(done, {f"eval/{k}": v for k, v in during.items()})
          save(done, best_metrics=during)
    progress.close()
    checkpointer.wait()
    train_time = time.time() - train_start

    # Final evaluation and the report.
    result = final_evaluation(config, evaluator, state, dataset, progress=is_writer)
    report = {"method": config.method, "dataset": config.data.name, "model": config.model.name,
              "norm": config.attack.norm, "epsilon": float(config.attack.epsilon),
              **result, "steps": int(state.step), "train_time_s": train_time,
              "compile_time_s": compile_s}
    if is_writer:
      report_lib.write_report(workdir, report)
      print(report_lib.to_markdown(report), flush=True)
    return report


def final_evaluation(config, evaluator, state, dataset, progress=False):
  n = config.eval.num_examples if config.eval.num_examples > 0 else len(dataset.test_labels)
  return evaluation.evaluate(
      evaluator, {"params": state.params, "batch_stats": state.batch_stats},
      dataset.test_images[:n], dataset.test_labels[:n], epsilon=config.attack.epsilon,
      attack_names=evaluation.parse_attack_names(config.eval.attacks),
      curve_points=config.eval.curve_points, curve_attack=config.eval.curve_attack,
      progress=progress)
