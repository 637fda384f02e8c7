"""Evaluation command: attacks a checkpoint of a training workdir and rewrites its report.

  python -m clead_jax.evaluate --workdir runs/digits --attacks=fgsm,pgd20,autoattack
  python -m clead_jax.evaluate --workdir runs/digits --checkpoint=200 --num_examples=100

Reads DIR/config.json (written by training) and the chosen checkpoint (default: the latest), runs
the attacks (default: config.eval.attacks) and the robustness curve on the test split, sharded
over all devices, and writes DIR/report.json, report.md and robustness_curve.png, with the same
keys as training's report. AutoAttack names (autoattack, autoattack_plus, autoattack_rand) add one
key per stage, e.g. "autoattack/apgd_ce", and the report lists warnings that flag a suspect
evaluation.
"""

import json
import os

import jax
import ml_collections
from absl import flags

from clead_jax import command_line
from clead_jax.errors import UserError

# Another entry point imported in the same process (tests) may have defined --workdir already.
if "workdir" not in flags.FLAGS:
  flags.DEFINE_string("workdir", None, "Workdir of a training run.")
_ATTACKS = flags.DEFINE_string(
    "attacks", None, "Comma-separated attacks: attacks.EVAL_ATTACKS (fgsm, pgd20, pgd100, cw, "
    "autoattack, ...), autoattack_plus, autoattack_rand; default config.eval.attacks.")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", "latest", "'latest', 'best' (kept when training ran with eval_every) or a step.")
_NUM_EXAMPLES = flags.DEFINE_integer(
    "num_examples", None, "Test examples to use (the first N); default config.eval.num_examples, "
    "-1 for the whole split.")
flags.mark_flags_as_required(["workdir"])


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, "config.json")
  try:
    with open(path) as f:
      return ml_collections.ConfigDict(json.loads(f.read()))
  except FileNotFoundError:
    raise UserError(f"--workdir {workdir!r} holds no config.json; point it at the workdir of a "
                    "training run (python -m clead_jax.main writes it)") from None
  except (OSError, ValueError) as e:
    raise UserError(f"{path} cannot be read ({e}); rerun training to rewrite it") from None


def choose_step(checkpoint: str, steps, directory: str) -> int:
  """The step named by --checkpoint ('latest', 'best' or an integer) among the available `steps`
  (for 'best', the steps of the best-checkpoint directory)."""
  if not steps:
    if checkpoint == "best":
      raise UserError(f"--checkpoint=best: {directory} holds no best checkpoint; it is kept only "
                      "when training evaluates as it goes (--config.train.eval_every=N epochs)")
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


def _previous_train_time(workdir, step):
  """The training report's train_time_s, if that report is of the same step; else 0.0."""
  try:
    with open(os.path.join(workdir, "report.json")) as f:
      previous = json.load(f)
  except (OSError, ValueError):
    return 0.0
  return float(previous.get("train_time_s", 0.0)) if previous.get("steps") == step else 0.0


def evaluate_workdir(workdir, attacks=None, checkpoint="latest", num_examples=None,
                     progress=True) -> dict:
  """Evaluates a checkpoint of `workdir`; writes and returns the report."""
  # pylint: disable=g-import-not-at-top  (flags parse before the heavy imports)
  from clead_jax import checkpointing
  from clead_jax import evaluation
  from clead_jax import input_pipeline
  from clead_jax import parallel
  from clead_jax import report as report_lib
  from clead_jax import train
  # pylint: enable=g-import-not-at-top
  config = load_config(workdir)
  attack_names = evaluation.parse_attack_names(attacks or config.eval.attacks, field="--attacks")
  best = checkpoint == "best"
  directory = os.path.join(os.path.abspath(workdir), "best_checkpoint" if best else "checkpoints")
  if not best and not os.path.isdir(directory):
    raise UserError(f"{directory} does not exist; train first (python -m clead_jax.main)")
  is_writer = jax.process_index() == 0

  # The model and the checkpoint, restored against the abstract state (nothing allocated twice).
  checkpointer = checkpointing.Checkpointer(workdir, config.train.keep_checkpoints)
  try:
    step = choose_step(checkpoint, checkpointer.best_steps() if best else checkpointer.all_steps(),
                       directory)
    mesh = parallel.make_mesh()
    dataset = input_pipeline.load_dataset(config.data)
    network, _, tx, _, _ = train.build(config, dataset)
    replicated = parallel.replicated(mesh)
    abstract_state = jax.eval_shape(
        lambda: train.create_train_state(network, tx, dataset.image_shape, config.seed))
    abstract_state = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), abstract_state)
    state, _ = checkpointer.restore(abstract_state, step, best=best)
  finally:
    checkpointer.close()
  if is_writer:
    print(f"clead_jax.evaluate: checkpoint {step} of {workdir}; {jax.device_count()} device(s) "
          f"({jax.devices()[0].platform}); attacks {', '.join(attack_names)}", flush=True)

  # The attacks.
  n = num_examples if num_examples is not None else config.eval.num_examples
  n = len(dataset.test_labels) if n is None or n <= 0 else min(n, len(dataset.test_labels))
  evaluator = evaluation.Evaluator(network, mesh, config.attack.norm, config.eval.batch_size,
                                   config.seed)
  result = evaluation.evaluate(
      evaluator, {"params": state.params, "batch_stats": state.batch_stats},
      dataset.test_images[:n], dataset.test_labels[:n], epsilon=config.attack.epsilon,
      attack_names=attack_names, curve_points=config.eval.curve_points,
      curve_attack=config.eval.curve_attack, progress=progress and is_writer)

  # The report, with the keys of training's report.
  steps = int(state.step)
  report = {"method": config.method, "dataset": config.data.name, "model": config.model.name,
            "norm": config.attack.norm, "epsilon": float(config.attack.epsilon), **result,
            "steps": steps, "train_time_s": _previous_train_time(workdir, steps)}
  if is_writer:
    report_lib.write_report(workdir, report)
    print(report_lib.to_markdown(report), flush=True)
  return report


def main(argv):
  command_line.start(argv)
  with command_line.user_errors_as_one_line():
    from clead_jax import distributed  # pylint: disable=g-import-not-at-top
    distributed.initialize()
    evaluate_workdir(flags.FLAGS.workdir, _ATTACKS.value, _CHECKPOINT.value, _NUM_EXAMPLES.value)


def run():
  command_line.run(main)


if __name__ == "__main__":
  run()
