"""The trainer: train_and_evaluate(config, workdir), which reads as its table of contents:

  setup            the mesh, the dataset and the model (train_state.py);
  restore_or_init  the latest good checkpoint of the workdir, or a fresh state;
  compile_steps    the jitted update steps, compiled ahead of time;
  train_loop       steps, logging, checkpoints, evaluations on the validation split, stops;
  final evaluation evaluation/workdir.py's evaluate_state, as the evaluate command runs it.

A stop (SIGINT/SIGTERM, clead_jax/stopping.py) is honoured at every phase: before the first step
nothing is saved (Stopped with nothing_ran); in the loop the current step is checkpointed; in the
final evaluation the finished attacks stay in the report and AutoAttack keeps its progress.
"""

import contextlib
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from clead_jax import checkpointing
from clead_jax import config_checks
from clead_jax import config_tools
from clead_jax import input_pipeline
from clead_jax import methods
from clead_jax import metric_logging
from clead_jax import parallel
from clead_jax import report as report_lib
from clead_jax import stopping
from clead_jax import train_state
from clead_jax import weight_perturbation
from clead_jax import workdir_lock
from clead_jax.errors import UserError
from clead_jax.evaluation import suite
from clead_jax.evaluation import workdir as workdir_lib

# --- the update step ------------------------------------------------------------------------------


def make_train_step(ctx, method, tx, schedule, awp_start_step=0):
  """train_step(state, batch) -> (state, metrics) for one method; pure, to be jitted.

  With config.train.awp_gamma > 0 (adversarial methods), from step `awp_start_step` on the
  gradient is taken at adversarially perturbed weights (weight_perturbation.py) and applied at the
  unperturbed ones. With config.train.ema_decay > 0 the state's weight averages follow each update.
  """
  ema_decay = ctx.config.train.get("ema_decay", 0.0)
  awp_gamma = ctx.config.train.get("awp_gamma", 0.0) if method.make_adversarial is not None else 0.0

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

    at_params = state.params
    if awp_gamma > 0:
      # lax.cond: the warm-up steps skip the ascent step's forward and backward pass.
      delta = jax.lax.cond(
          state.step >= awp_start_step,
          lambda: weight_perturbation.perturbation(loss_fn, state.params, awp_gamma),
          lambda: jax.tree.map(jnp.zeros_like, state.params))
      at_params = weight_perturbation.add(state.params, delta)
    (loss, (batch_stats, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(at_params)
    # The update starts from the unperturbed weights: AWP's perturbation is gone from here on.
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads),
                   learning_rate=schedule(state.step))
    new_state = train_state.update_ema(state, params, batch_stats, ema_decay).replace(
        step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
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


# --- the workdir ------------------------------------------------------------------------------------

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


def _archive_earlier_metrics(workdir):
  """A run that starts from step 0 in a workdir with metrics of an earlier run (whose checkpoints
  are gone) keeps those as metrics.<n>.jsonl, so that metrics.jsonl is of one run only."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path) or os.path.getsize(path) == 0:
    return
  k = 1
  while os.path.exists(os.path.join(workdir, f"metrics.{k}.jsonl")):
    k += 1
  os.replace(path, os.path.join(workdir, f"metrics.{k}.jsonl"))
  _say(f"{path} held metrics of an earlier run without a readable checkpoint; kept as "
       f"metrics.{k}.jsonl")


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
  if jax.process_index() == 0:  # one writer per workdir (process 0 of a multi-process run)
    workdir_lock.acquire(workdir)


def _say(text):
  if jax.process_index() == 0:
    print(f"clead_jax: {text}", flush=True)


def restore_or_init(config, workdir, model, mesh, checkpointer):
  """(state, meta): the latest good checkpoint of the workdir, or a fresh state (meta None).

  A checkpoint of a config that differs in a field that changes the run is refused with one
  line; config.train.init_from starts a fresh run from another run's parameters.
  """
  abstract = train_state.abstract_state(model, config.seed, mesh)
  config_dict = json.loads(config.to_json_best_effort())
  state, meta = checkpointer.restore_latest_good(abstract, config_dict)  # refuses another config
  if state is not None:
    _say(f"resuming from step {int(state.step)} in {checkpointer.directory}")
    if jax.process_index() == 0:
      _truncate_metrics(workdir, int(state.step))
    return state, meta
  if jax.process_index() == 0:
    _archive_earlier_metrics(workdir)
  state = train_state.init_state(model, config.seed, mesh)
  if config.train.init_from:
    replicated = parallel.replicated(mesh)
    params, batch_stats = checkpointing.restore_params(config.train.init_from, abstract.params)
    state = jax.jit(lambda s, p, b: train_state.with_weights(s, p, b, model.tx),
                    out_shardings=replicated)(state, params, batch_stats)
  return state, None


def compile_steps(config, model, state, dataset, mesh):
  """{method name: compiled step} (clean pretraining, then the method) and their compile times."""
  pretrain = config.train.pretrain_epochs > 0
  steps, compile_s = {}, {}
  batch_shape = (config.train.batch_size,) + tuple(dataset.image_shape)
  ctx = methods.Context(model.network, config)
  awp_start_step = config.train.awp_warmup_epochs * model.steps_per_epoch
  for name in sorted({"standard" if pretrain else config.method, config.method}):
    jitted = jit_train_step(make_train_step(ctx, methods.METHODS[name], model.tx, model.schedule,
                                            awp_start_step), mesh)
    steps[name], compile_s[name] = compile_step(jitted, state, batch_shape,
                                                dataset.train_images.dtype, mesh)
  _say("compiled train step in " + ", ".join(f"{k}: {v:.1f} s" for k, v in compile_s.items()))
  return steps, compile_s


# --- the loop -----------------------------------------------------------------------------------------

class _Saver:
  """Saves checkpoints with their metadata; the train time adds up over resumed runs."""

  def __init__(self, config, checkpointer, abstract_params, per_epoch, train_time_before):
    self.config_dict = json.loads(config.to_json_best_effort())
    self.checkpointer = checkpointer
    self.shapes = checkpointing.param_shapes(abstract_params)
    self.per_epoch = per_epoch
    self.train_time_before = train_time_before
    self.started = time.time()
    self.last_saved = None
    self.trained = False  # whether this process trained a step (a resumed finished run: no)
    self.saved_train_time = train_time_before  # the train time the latest checkpoint holds

  def train_time(self):
    if not self.trained:
      return self.train_time_before
    return self.train_time_before + time.time() - self.started

  def save(self, state, best_metrics=None):
    step = int(state.step)
    if best_metrics is None and step == self.last_saved:
      return
    meta = {"config": self.config_dict, "param_shapes": self.shapes,
            "train_time_s": self.train_time(),
            "data": {"seed": self.config_dict["seed"], "next_step": step,
                     "epoch": step // self.per_epoch, "batch_in_epoch": step % self.per_epoch}}
    self.checkpointer.save(step, state, meta, metrics=best_metrics,
                           best=best_metrics is not None)
    self.saved_train_time = meta["train_time_s"]
    if best_metrics is None:
      self.last_saved = step


def _check_finite(pending, done, checkpointer):
  for offset, m in enumerate(pending):
    if not np.isfinite(m["loss"]):
      latest = checkpointer.latest_step()
      kept = (f"the last good checkpoint (step {latest}) is kept" if latest is not None
              else "no checkpoint was saved yet")
      raise UserError(
          f"non-finite loss at step {done - len(pending) + offset + 1}: " + ", ".join(
              f"{k}={float(v):.4g}" for k, v in sorted(m.items()))
          + f"; stopped, {kept}; lower config.train.learning_rate or check the data")


def train_loop(config, workdir, model, state, steps, dataset, mesh, checkpointer, saver):
  """Trains from state.step to the end; returns the final state. Raises stopping.Stopped after
  checkpointing the current step when a stop is requested."""
  is_writer = jax.process_index() == 0
  pretrain_steps = config.train.pretrain_epochs * model.steps_per_epoch
  total_steps = model.total_steps
  start_step = int(state.step)
  batches = input_pipeline.train_batches(dataset, config.train.batch_size, config.seed,
                                         start_step, parallel.batch_sharding(mesh))
  eval_steps = config.train.eval_every * model.steps_per_epoch
  evaluator = suite.Evaluator(model.network, mesh, config.attack.norm, config.eval.batch_size,
                              config.seed) if eval_steps else None
  writer = metric_logging.MetricWriter(workdir, enabled=is_writer)
  log_start, log_step, pending = time.time(), start_step, []
  progress = tqdm(total=total_steps, initial=start_step, disable=not is_writer, desc="train",
                  dynamic_ncols=True)
  with contextlib.closing(writer), contextlib.closing(progress):
    for step in range(start_step, total_steps):
      method = "standard" if step < pretrain_steps else config.method
      state, metrics = steps[method](state, next(batches))
      saver.trained = True
      pending.append(metrics)
      done = step + 1
      stopping_now = stopping.requested_at_step(done)
      is_log = done % config.train.log_every == 0 or done == total_steps
      is_checkpoint = (done % config.train.checkpoint_every == 0 or done == total_steps
                       or stopping_now)
      if is_log or is_checkpoint:
        pending = [jax.device_get(m) for m in pending]
        _check_finite(pending, done, checkpointer)
      if is_log:
        keys = sorted({k for m in pending for k in m})  # keys change when pretraining ends
        means = {k: float(np.mean([m[k] for m in pending if k in m])) for k in keys}
        means["images_per_s"] = ((done - log_step) * config.train.batch_size
                                 / max(time.time() - log_start, 1e-9))
        means["epoch"] = done / model.steps_per_epoch
        writer.write(done, means)
        progress.set_postfix({k: f"{means[k]:.3f}" for k in
                              ("loss", "clean_accuracy", "adv_accuracy") if k in means})
        log_start, log_step, pending = time.time(), done, []
      if is_checkpoint:
        if not _all_finite(state.params):
          latest = checkpointer.latest_step()
          raise UserError(f"non-finite parameters after step {done}; stopped, "
                          + (f"the last good checkpoint (step {latest}) is kept"
                             if latest is not None else "no checkpoint was saved yet")
                          + "; lower config.train.learning_rate")
        saver.save(state)
      progress.update(1)
      if eval_steps and done % eval_steps == 0 and done != total_steps and not stopping_now:
        try:
          saver.save(state, best_metrics=validation_metrics(config, evaluator, state, dataset,
                                                            writer))
        except stopping.Stopped:  # during the validation: keep the step, then stop
          saver.save(state)
          stopping_now = True
      if stopping_now:
        checkpointer.wait()
        raise stopping.Stopped(
            stopping.signal_name() or "a preemption notice (SIGTERM to one of the processes)",
            f"checkpoint saved at step {done} in {checkpointer.directory}/{done}; run the same "
            "command to resume")
  checkpointer.wait()
  return state


def validation_metrics(config, evaluator, state, dataset, writer):
  """Clean and PGD-20 accuracy on the validation split (never a test image), of the weights the
  report evaluates (config.eval.weights); logged."""
  n = config.eval.during_train_examples
  images, labels = dataset.validation_images[:n], dataset.validation_labels[:n]
  variables = train_state.weights_of(state, train_state.evaluated_weights(config))
  clean = evaluator.accuracy(variables, images, labels, "clean", 0.0)
  robust = evaluator.accuracy(variables, images, labels, "pgd20", config.attack.epsilon)
  metrics = {"clean_accuracy": clean, "pgd20_accuracy": robust}
  writer.write(int(state.step), {f"validation/{k}": v for k, v in metrics.items()})
  return metrics


# --- the whole run --------------------------------------------------------------------------------

def train_and_evaluate(config, workdir: str) -> dict:
  """Trains config.method, evaluates it, writes DIR/report.*; resumes from DIR's checkpoints.

  Returns the report. Raises stopping.Stopped when a stop was requested (what was kept is in its
  message), UserError for bad input.
  """
  # Setup: the mesh, the dataset and the model.
  config_checks.validate(config)
  parallel.enable_compilation_cache(config.compilation_cache_dir)
  mesh = parallel.make_mesh()
  per_device = parallel.check_global_batch(config.train.batch_size)
  _say(f"{jax.process_count()} process(es), {jax.device_count()} device(s) "
       f"({jax.devices()[0].platform}); global batch {config.train.batch_size}, per-device batch "
       f"{per_device}")
  dataset = input_pipeline.load_dataset(config.data)
  model = train_state.build(config, dataset)
  _prepare_workdir(workdir)

  checkpointer = checkpointing.Checkpointer(workdir, config.train.keep_checkpoints)
  with contextlib.closing(checkpointer):  # waits for saves in flight, also on an error
    state, meta = restore_or_init(config, workdir, model, mesh, checkpointer)
    if jax.process_index() == 0:
      config_tools.atomic_write(os.path.join(workdir, "config.json"),
                                config.to_json_best_effort(sort_keys=True, indent=2) + "\n")
    steps, compile_s = compile_steps(config, model, state, dataset, mesh)
    if stopping.requested():
      latest = checkpointer.latest_step()
      raise stopping.Stopped(
          stopping.signal_name(), "before the first training step of this run (during "
          "compilation); " + (f"checkpoints up to step {latest} are kept" if latest is not None
                              else "nothing was saved yet") + "; run the same command to "
          + ("resume" if latest is not None else "start"), nothing_ran=True)
    saver = _Saver(config, checkpointer, state.params, model.steps_per_epoch,
                   (meta or {}).get("train_time_s", 0.0))
    state = train_loop(config, workdir, model, state, steps, dataset, mesh, checkpointer, saver)
    # The report's train time is the one the final checkpoint holds, so that a rerun that only
    # finishes the evaluation reports the same number.
    train_time = saver.saved_train_time

  # Final evaluation: the attacks not yet in the report of this checkpoint.
  step = int(state.step)
  n = workdir_lib.num_test_examples(config.eval.num_examples, dataset, "config.eval.num_examples")
  weights = train_state.evaluated_weights(config)
  try:
    report = workdir_lib.evaluate_state(
        config, workdir, model.network, train_state.weights_of(state, weights), step,
        dataset, mesh,
        attack_names=suite.parse_attack_names(config.eval.attacks), num_examples=n,
        checkpoint_info={"step": step, "rule": workdir_lib.checkpoint_rule(
            "latest", step, model.total_steps, config)},
        header_extra={"train_time_s": train_time, "compile_time_s": compile_s,
                      "total_steps": model.total_steps},
        progress=True, skip_measured=True, weights=weights)
  except stopping.Stopped as stopped:
    stopped.what_was_kept = (
        f"training is finished and checkpoint {step} is saved; the final evaluation stopped: "
        f"the report keeps the attacks finished so far"
        + (f", {stopped.what_was_kept}" if stopped.what_was_kept else "")
        + "; run the same command to finish it")
    raise
  if jax.process_index() == 0:
    print(report_lib.to_markdown(report), flush=True)
  return report
