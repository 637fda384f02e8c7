"""Evaluating a training workdir: its config, a checkpoint of it, the report it accumulates.

Training's final evaluation and the evaluate command both end in `evaluate_state`, so the two
write the same report. The report continues (attacks added or replaced, the rest kept) while the
evaluation is the same one: see clead_jax/report.py.
"""

import json
import os

import jax
import ml_collections

from clead_jax import checkpointing
from clead_jax import input_pipeline
from clead_jax import parallel
from clead_jax import provenance
from clead_jax import report as report_lib
from clead_jax import train_state
from clead_jax import workdir_lock
from clead_jax.errors import UserError
from clead_jax.evaluation import suite

AUTOATTACK_STATE_DIR = "autoattack_state"


def _with_defaults(stored, defaults):
  """The stored config over the defaults: fields added since the run was trained get their
  default value (which is what those runs did)."""
  merged = dict(defaults)
  for key, value in stored.items():
    if isinstance(value, dict) and isinstance(defaults.get(key), dict):
      merged[key] = _with_defaults(value, defaults[key])
    else:
      merged[key] = value
  return merged


def load_config(workdir: str, flag="--workdir") -> ml_collections.ConfigDict:
  """DIR/config.json, with the defaults of fields newer than the run."""
  from clead_jax import default_config  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, "config.json")
  try:
    with open(path) as f:
      stored = json.loads(f.read())
    return ml_collections.ConfigDict(_with_defaults(stored,
                                                    default_config.get_base_config().to_dict()))
  except FileNotFoundError:
    raise UserError(f"{flag} {workdir!r} holds no config.json; point it at the workdir of a "
                    "training run (python -m clead_jax.main writes it)") from None
  except (OSError, ValueError) as e:
    raise UserError(f"{path} cannot be read ({e}); rerun training to rewrite it") from None


def choose_step(checkpoint: str, steps, directory: str) -> int:
  """The step named by --checkpoint ('latest', 'best' or an integer) among the available `steps`
  (for 'best', the steps of the best-checkpoint directory)."""
  if not steps:
    if checkpoint == "best":
      raise UserError(f"--checkpoint=best: {directory} holds no best checkpoint; it is kept only "
                      "when training evaluates on a validation split as it goes "
                      "(--config.train.eval_every=N epochs, --config.data.validation_size=M)")
    raise UserError(f"{directory} holds no checkpoint; train first (python -m clead_jax.main)")
  if checkpoint in ("latest", "best"):
    return max(steps)
  try:
    step = int(checkpoint)
  except ValueError:
    raise UserError(f"--checkpoint={checkpoint!r} is not 'latest', 'best' or a step; available "
                    f"steps: {sorted(steps)}") from None
  if step not in steps:
    raise UserError(f"--checkpoint={step}: no checkpoint at step {step} in {directory}; "
                    f"available steps: {sorted(steps)}")
  return step


def checkpoint_rule(checkpoint, step, total_steps, config):
  """How the evaluated checkpoint was chosen, in words, for the report."""
  if checkpoint == "best":
    return (f"best validation PGD-20 accuracy during training, on the "
            f"{config.data.validation_size} held-out training images; no test image was used")
  if step == total_steps:
    return "the last step of training (no selection)"
  if checkpoint == "latest":
    return f"the latest checkpoint; training is not finished ({step} of {total_steps} steps)"
  return f"step {step}, chosen by --checkpoint"


def restore_checkpoint(workdir, config, model, mesh, checkpoint="latest", best=None):
  """(state, step, meta) of the checkpoint of `workdir` named by `checkpoint` ('latest', 'best'
  or a step); best=True looks for a step among the best checkpoints (default: checkpoint ==
  'best')."""
  best = checkpoint == "best" if best is None else best
  directory = os.path.join(os.path.abspath(workdir), "best_checkpoint" if best else "checkpoints")
  if not best and not os.path.isdir(directory):
    raise UserError(f"{directory} does not exist; train first (python -m clead_jax.main)")
  checkpointer = checkpointing.Checkpointer(workdir, config.train.keep_checkpoints)
  try:
    step = choose_step(checkpoint, checkpointer.best_steps() if best else checkpointer.all_steps(),
                       directory)
    abstract = train_state.abstract_state(model, config.seed, mesh)
    meta = checkpointer.read_meta(step, best=best)
    checkpointing.check_same_model(meta, abstract, directory, step)
    state, meta = checkpointer.restore(abstract, step, best=best)
  finally:
    checkpointer.close()
  return state, step, meta


def evaluated_variables(state, config):
  """The variables of a train state that evaluation, export and the study measure: the averaged
  ones when EMA is on, unless config.eval.weights says otherwise (train_state.evaluated_weights)."""
  return train_state.weights_of(state, train_state.evaluated_weights(config))


def final_weights_fingerprint(workdir, config, dataset, mesh):
  """(fingerprint of the weights a run's final evaluation measures, its step), from the
  latest checkpoint; (None, None) when none can be read."""
  model = train_state.build(config, dataset)
  try:
    state, step, _ = restore_checkpoint(workdir, config, model, mesh)
  except UserError:
    return None, None
  return provenance.weights_fingerprint(evaluated_variables(state, config)), step


TORCH_SOURCE = "torch:"  # a report's checkpoint_source for an imported PyTorch file


def restore_evaluated(workdir, report, config, dataset, mesh):
  """(network, variables, mean, std) of the model DIR's `report` evaluated: the training
  checkpoint (last or best) or the imported PyTorch file its identity names. The weights'
  fingerprint must be the report's: otherwise the checkpoint or file was replaced since, and
  this is a UserError saying so."""
  evaluation = report.get("evaluation", {})
  source = evaluation.get("checkpoint_source", "checkpoints")
  if source.startswith(TORCH_SOURCE):
    where = source[len(TORCH_SOURCE):]
    network, variables, mean, std, _ = load_torch_model(config, where, dataset, mesh)
  else:
    model = train_state.build(config, dataset)
    step = evaluation.get("checkpoint_step", report.get("steps"))
    state, _, _ = restore_checkpoint(workdir, config, model, mesh, str(step),
                                     best=source == "best_checkpoint")
    network, variables = model.network, evaluated_variables(state, config)
    mean, std = dataset.mean, dataset.std
    where = f"{source}/ step {step}"
  wanted = evaluation.get("weights_fingerprint")
  found = provenance.weights_fingerprint(variables)
  if wanted != found:
    raise UserError(f"the report in {workdir} is of weights {wanted or '(none: an older report)'} "
                    f"but {where} now holds weights {found}; run python -m clead_jax.evaluate "
                    f"--workdir {workdir} --attacks=autoattack again first")
  return network, variables, mean, std


def load_surrogate(surrogate_workdir, dataset, mesh):
  """The latest checkpoint of another run, as the network a transfer attack makes points on."""
  config = load_config(surrogate_workdir, flag="config.eval.surrogate")
  if config.data.name != dataset.name:
    raise UserError(f"config.eval.surrogate={surrogate_workdir!r} was trained on "
                    f"{config.data.name!r}, not {dataset.name!r}; use a run on the same data")
  model = train_state.build(config, dataset)
  state, _, _ = restore_checkpoint(surrogate_workdir, config, model, mesh)
  evaluator_network = suite.Evaluator(model.network, mesh, config.attack.norm, 1, 0).network
  return suite.Surrogate(lambda v, x: evaluator_network.apply(v, x, train=False),
                         evaluated_variables(state, config), surrogate_workdir)


def evaluation_identity(config, step, source, num_examples, weights_fingerprint):
  """What makes two evaluations the same one (report.Report continues it, AutoAttack's saved
  progress resumes it): the weights as evaluated and the training config, by fingerprint
  (clead_jax/provenance.py), then the checkpoint, data, examples and threat model."""
  return {"weights_fingerprint": weights_fingerprint,
          "config_fingerprint": provenance.config_fingerprint(config),
          "checkpoint_step": int(step), "checkpoint_source": source,
          "dataset": config.data.name, "split": "test", "num_examples": int(num_examples),
          "epsilon": float(config.attack.epsilon), "norm": config.attack.norm,
          "model": config.model.name}


def num_test_examples(requested, dataset, field):
  """The first N test examples to evaluate: -1 means all; 0 or below -1 is an error."""
  total = len(dataset.test_labels)
  if requested is None or requested == -1:
    return total
  if requested < 1:
    raise UserError(f"{field}={requested} must be -1 (the whole test split) or a positive count "
                    f"of test examples (at most {total})")
  return min(requested, total)


def evaluate_state(config, workdir, network, state_variables, step, dataset, mesh, *, attack_names,
                   num_examples, checkpoint_info, header_extra=None, progress=False,
                   source="checkpoints", skip_measured=False, weights="raw"):
  """Evaluates `state_variables` on the first `num_examples` test images into DIR's report.

  weights: which weights `state_variables` are ('ema': the averaged ones, 'raw'); the report's
  header says it, and an evaluation of the other weights is another evaluation.

  skip_measured: attacks the report already holds for this evaluation are not run again
  (training's final evaluation, resumed); otherwise they are measured again and replaced.

  Returns the report dict. A stop (clead_jax/stopping.py) keeps every attack finished so far and
  AutoAttack's progress.
  """
  is_writer = jax.process_index() == 0
  evaluator = suite.Evaluator(network, mesh, config.attack.norm, config.eval.batch_size,
                              config.seed)
  header = {"method": config.method, "dataset": config.data.name, "model": config.model.name,
            "norm": config.attack.norm, "epsilon": float(config.attack.epsilon),
            "num_examples": int(num_examples), "test_split_size": len(dataset.test_labels),
            "steps": int(step), "checkpoint": checkpoint_info, "weights": weights,
            **(header_extra or {})}
  identity = dict(evaluation_identity(config, step, source, num_examples,
                                      provenance.weights_fingerprint(state_variables)),
                  weights=weights)
  report = report_lib.Report(workdir, header, identity, is_writer=is_writer)
  report.announce_archive()
  if skip_measured:
    attack_names = [name for name in attack_names if name not in report.flags]
  surrogate = None
  if any(name in suite.TRANSFER_ATTACKS for name in attack_names):
    if not config.eval.get("surrogate"):
      raise UserError("transfer_pgd3 needs a surrogate: set --config.eval.surrogate to the workdir "
                      "of a standard (non-robust) run on the same data")
    surrogate = load_surrogate(config.eval.surrogate, dataset, mesh)
  state_dir = os.path.join(workdir, AUTOATTACK_STATE_DIR)
  return suite.evaluate(
      evaluator, state_variables, dataset.test_images[:num_examples],
      dataset.test_labels[:num_examples], epsilon=config.attack.epsilon,
      attack_names=attack_names, curve_points=config.eval.curve_points,
      curve_attack=config.eval.curve_attack, progress=progress and is_writer, report=report,
      surrogate=surrogate, autoattack_state=lambda name: os.path.join(state_dir, f"{name}.npz"),
      autoattack_identity=identity, with_indicators=config.eval.indicators)


def threat_model_dir(workdir, config, epsilon=None, norm=None):
  """Where the report of an evaluation at (epsilon, norm) goes: the workdir for training's own
  threat model, else DIR/<norm>_eps<E>/ (a report of its own, never merged into the main one).
  Sets config.attack to the threat model."""
  norm = norm or config.attack.norm
  epsilon = float(config.attack.epsilon if epsilon is None else epsilon)
  if norm == config.attack.norm and epsilon == float(config.attack.epsilon):
    return workdir
  config.attack.norm, config.attack.epsilon = norm, epsilon
  return os.path.join(workdir, f"{norm}_eps{epsilon:g}")


def evaluate_workdir(workdir, attacks=None, checkpoint="latest", num_examples=None,
                     progress=True, epsilon=None, norm=None, indicators=None,
                     report_dir=None) -> dict:
  """Evaluates a checkpoint of `workdir`; adds to its report and returns it. With `epsilon`
  (and `norm`) other than training's, the report is DIR/<norm>_eps<E>/'s; with `report_dir`, that
  directory's (the workdir's own report stays as it is). `indicators`: whether the indicators of
  attack failure are computed (None: config.eval.indicators)."""
  config = load_config(workdir)
  if indicators is not None:
    config.eval.indicators = bool(indicators)
  own_dir = threat_model_dir(workdir, config, epsilon, norm)
  if report_dir and os.path.realpath(report_dir) == os.path.realpath(workdir):
    raise UserError(f"--report_dir {report_dir} is the workdir itself; leave --report_dir out to "
                    "add to the workdir's report, or name another directory")
  if report_dir and jax.process_index() == 0:
    os.makedirs(report_dir, exist_ok=True)
    workdir_lock.acquire(report_dir, "--report_dir")
  report_dir = report_dir or own_dir
  attack_names = suite.parse_attack_names(attacks or config.eval.attacks, field="--attacks")
  parallel.enable_compilation_cache(config.compilation_cache_dir)
  mesh = parallel.make_mesh()
  dataset = input_pipeline.load_dataset(config.data)
  model = train_state.build(config, dataset)
  state, step, meta = restore_checkpoint(workdir, config, model, mesh, checkpoint)
  n = num_test_examples(num_examples if num_examples is not None else config.eval.num_examples,
                        dataset, "--num_examples" if num_examples is not None
                        else "config.eval.num_examples")
  if jax.process_index() == 0:
    print(f"clead_jax.evaluate: checkpoint {step} of {workdir}; {jax.device_count()} device(s) "
          f"({jax.devices()[0].platform}); attacks {', '.join(attack_names)}"
          + (f"; {config.attack.norm} epsilon {config.attack.epsilon:g}, report in {report_dir}"
             if report_dir != workdir else ""), flush=True)
  info = {"step": int(step),
          "rule": checkpoint_rule(checkpoint, step, model.total_steps, config)}
  extra = {"train_time_s": float(meta.get("train_time_s", 0.0)), "total_steps": model.total_steps}
  return evaluate_state(config, report_dir, model.network, evaluated_variables(state, config),
                        step, dataset, mesh,
                        attack_names=attack_names, num_examples=n, checkpoint_info=info,
                        header_extra=extra, progress=progress,
                        source="best_checkpoint" if checkpoint == "best" else "checkpoints",
                        weights=train_state.evaluated_weights(config))


def load_torch_model(config, torch_path, dataset, mesh):
  """(network, variables, mean, std, origin) of a PyTorch checkpoint (see
  evaluate_torch_checkpoint), the variables replicated over `mesh`; `origin`: the 'clead_jax'
  entry of our export (the run's config, step, fingerprints), else None."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from clead_jax import torch_weights  # pylint: disable=g-import-not-at-top
  from clead_jax import models  # pylint: disable=g-import-not-at-top
  torch = torch_weights.import_torch()
  if not os.path.exists(torch_path):
    raise UserError(f"--torch_checkpoint {torch_path}: no such file")
  try:
    checkpoint = torch.load(torch_path, map_location="cpu", weights_only=False)
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f"--torch_checkpoint {torch_path} cannot be read by torch.load "
                    f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
  channels = dataset.image_shape[-1]
  mean = checkpoint.get("mean", [0.0] * channels) if isinstance(checkpoint, dict) else None
  std = checkpoint.get("std", [1.0] * channels) if isinstance(checkpoint, dict) else None
  mean, std = mean or [0.0] * channels, std or [1.0] * channels
  network = models.build_network(config.model, dataset.num_classes, mean, std)
  abstract = jax.eval_shape(lambda: network.init(
      jax.random.key(0), jax.numpy.zeros((1,) + tuple(dataset.image_shape)), train=False))
  state = {k: v.detach().cpu().numpy() for k, v in torch_weights.unwrap_state_dict(checkpoint).items()}
  head = checkpoint.get("projection_head") if isinstance(checkpoint, dict) else None
  head = {k: np.asarray(v) for k, v in head.items()} if head else None
  variables = torch_weights.from_torch(config.model, state, abstract, source=torch_path, head=head)
  origin = checkpoint.get("clead_jax") if isinstance(checkpoint, dict) else None
  return (network, jax.device_put(variables, parallel.replicated(mesh)), mean, std,
          origin if isinstance(origin, dict) else None)


def evaluate_torch_checkpoint(config, torch_path, workdir, attacks=None, num_examples=None,
                              progress=True) -> dict:
  """Evaluates a PyTorch checkpoint (ours from clead_jax.export, RobustBench's, or any state
  dict of a registry architecture) with the config's data, model and threat model; the report
  goes to `workdir`. Inputs are [0, 1]; the normalisation is the checkpoint's own ('mean' and
  'std' entries, as ours have) or none (RobustBench's models normalise inside, if at all)."""
  from clead_jax import config_tools  # pylint: disable=g-import-not-at-top
  attack_names = suite.parse_attack_names(attacks or config.eval.attacks, field="--attacks")
  dataset = input_pipeline.load_dataset(config.data)
  parallel.enable_compilation_cache(config.compilation_cache_dir)
  mesh = parallel.make_mesh()
  network, variables, _, _, origin = load_torch_model(config, torch_path, dataset, mesh)
  n = num_test_examples(num_examples if num_examples is not None else config.eval.num_examples,
                        dataset, "--num_examples" if num_examples is not None
                        else "config.eval.num_examples")
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    workdir_lock.acquire(workdir)  # one writer (a no-op when evaluate took it already)
    config_tools.atomic_write(os.path.join(workdir, "config.json"),
                              config.to_json_best_effort(sort_keys=True, indent=2) + "\n")
  info = {"step": 0, "rule": f"the PyTorch checkpoint {torch_path}"}
  extra = {"method": "imported", "torch_checkpoint": torch_path}
  if origin and isinstance(origin.get("config"), dict):  # our export: its run's
    extra.update(method=f"{origin['config'].get('method', 'unknown')} (imported)",
                 steps=int(origin.get("step", 0)))
  return evaluate_state(config, workdir, network, variables, 0, dataset, mesh,
                        attack_names=attack_names, num_examples=n, checkpoint_info=info,
                        header_extra=extra,
                        progress=progress, source=f"{TORCH_SOURCE}{os.path.abspath(torch_path)}")
