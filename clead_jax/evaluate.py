"""The evaluation command (console script: clead-evaluate): attacks a checkpoint of a training
workdir and adds the results to its report.

  python -m clead_jax.evaluate --workdir runs/digits --attacks=autoattack
  python -m clead_jax.evaluate --workdir runs/digits --checkpoint=best --num_examples=100

Reads DIR/config.json and the chosen checkpoint (default: the latest), runs the attacks (default:
config.eval.attacks) and the robustness curve on the test split, sharded over all devices, and
adds them to DIR/report.json and report.md: the attacks it ran are added or replaced, the others
kept, as long as the report is of the same checkpoint, epsilon, norm and examples (else the old
report is kept as report.<step>.json). AutoAttack saves its progress in DIR/autoattack_state/; a
stopped evaluation resumes when the same command runs again. See clead_jax/evaluation/.

A PyTorch checkpoint (ours from clead_jax.export, RobustBench's, or any state dict of a registry
architecture, nested under 'state_dict' and prefixed by 'module.' or 'model.' or not):

  python -m clead_jax.evaluate --torch_checkpoint model.pt --config configs/cifar10.py \
      --config.model.name=wide_resnet --config.model.depth=28 --config.model.widen=10 \
      --workdir runs/imported --attacks=autoattack

converts the weights into the config's Flax model (a mismatch is one line naming the first
offending tensor) and writes the usual report into --workdir. Inputs are in [0, 1]; the
normalisation is the checkpoint's own ('mean'/'std' entries, as our exports have) or none.

Another threat model than training's (the report of the training epsilon is left as it is):

  python -m clead_jax.evaluate --workdir runs/digits --epsilon 0.1 [--norm l2]

writes a report of its own into DIR/<norm>_eps<E>/ (report.json, report.md, ...), which
accumulates like the main one. Other test examples than the run's report (e.g. PGD-20 on the
whole split of a study run evaluated on 1,000), without touching that report:

  python -m clead_jax.evaluate --workdir runs/digits --attacks=pgd20 --num_examples=-1 \
      --report_dir runs/digits/all_test

One process writes a workdir at a time (DIR/clead_jax.lock names it); the workdir is checked
for writing before any work.
"""

from absl import flags
from ml_collections import config_flags

from clead_jax import command_line
from clead_jax import stopping


def _define_flags():
  flags.DEFINE_string("workdir", None, "Workdir of a training run.")
  flags.DEFINE_string(
      "attacks", None, "Comma-separated attacks (fgsm, pgd20, pgd100, cw, autoattack, "
      "autoattack_plus, autoattack_rand, transfer_pgd3); default config.eval.attacks.")
  flags.DEFINE_string(
      "checkpoint", "latest", "'latest', 'best' (kept when training ran with eval_every) or a step.")
  flags.DEFINE_integer(
      "num_examples", None, "Test examples to use (the first N); default config.eval.num_examples; "
      "-1: the whole split.")
  flags.DEFINE_string("torch_checkpoint", None, "A PyTorch checkpoint to evaluate instead of a "
                      "training workdir's (needs --config; --workdir receives the report).")
  config_flags.DEFINE_config_file("config", None, "With --torch_checkpoint: the config of the "
                                  "data, model and threat model.", lock_config=True)
  flags.DEFINE_float("epsilon", None, "Evaluate at this epsilon instead of training's; the "
                     "report goes to DIR/<norm>_eps<E>/, the training epsilon's report stays.")
  flags.DEFINE_enum("norm", None, ["linf", "l2"], "With --epsilon: the norm (default: training's).")
  flags.DEFINE_string("report_dir", None, "Write the report into this directory instead of the "
                      "workdir's (whose report stays as it is), e.g. for other --num_examples.")
  flags.DEFINE_boolean("indicators", None, "Compute the indicators of attack failure (they "
                       "re-run PGD and APGD on up to 512 points and change no accuracy); default "
                       "config.eval.indicators.")
  flags.DEFINE_integer("cpu_devices", None, "On a machine without accelerators: split every batch "
                       "over this many CPU devices (default: one per usable core; 1: JAX's single "
                       "CPU device). Results do not depend on it.")


def main(argv):
  command_line.start(argv)
  command_line.require("workdir")
  values = flags.FLAGS
  command_line.log_to(values.workdir)
  with command_line.user_errors_as_one_line():
    # pylint: disable=g-import-not-at-top  (after the flags and the signal handlers)
    from clead_jax import distributed
    from clead_jax import report as report_lib
    from clead_jax.errors import UserError
    from clead_jax.evaluation import workdir as workdir_lib
    from clead_jax import workdir_lock
    from clead_jax import parallel
    import jax
    if values.cpu_devices is not None and values.cpu_devices < 1:
      raise UserError(f"--cpu_devices={values.cpu_devices} must be >= 1 (1: JAX's single CPU "
                      "device)")
    parallel.use_cpu_cores_as_devices(values.cpu_devices)
    distributed.initialize()
    if values.norm is not None and values.epsilon is None:
      raise UserError("--norm needs --epsilon E: the radius of the threat model in that norm")
    if values.epsilon is not None and not values.epsilon > 0:
      raise UserError(f"--epsilon={values.epsilon} must be > 0")
    workdir_lock.check_writable(values.workdir, "--workdir")
    if values.report_dir:
      if values.torch_checkpoint:
        raise UserError("--report_dir is for a training workdir's evaluation; with "
                        "--torch_checkpoint the report goes to --workdir")
      workdir_lock.check_writable(values.report_dir, "--report_dir")
    if jax.process_index() == 0:
      workdir_lock.acquire(values.workdir)
    try:
      if values.torch_checkpoint:
        if values.config is None:
          raise UserError("--torch_checkpoint needs --config FILE: the data, model and threat "
                          "model to evaluate it with")
        if values.indicators is not None:
          values.config.eval.indicators = values.indicators
        if values.epsilon is not None:
          values.config.attack.epsilon = values.epsilon
          values.config.attack.norm = values.norm or values.config.attack.norm
        report = workdir_lib.evaluate_torch_checkpoint(
            values.config, values.torch_checkpoint, values.workdir, values.attacks,
            values.num_examples)
      elif values.config is not None:
        raise UserError("--config is only for --torch_checkpoint; a training workdir's evaluation "
                        "uses DIR/config.json")
      else:
        report = workdir_lib.evaluate_workdir(values.workdir, values.attacks, values.checkpoint,
                                              values.num_examples, epsilon=values.epsilon,
                                              norm=values.norm, indicators=values.indicators,
                                              report_dir=values.report_dir)
    except stopping.Stopped as stopped:
      stopped.what_was_kept = ("the report keeps every attack finished so far"
                               + (f"; {stopped.what_was_kept}" if stopped.what_was_kept else "")
                               + "; run the same command to resume")
      raise
    if jax.process_index() == 0:
      print(report_lib.to_markdown(report), flush=True)


def run():
  command_line.run(main, _define_flags, __doc__, config_fields=False, override_hint=(
      "evaluate reads the workdir's config.json: --epsilon E [--norm linf|l2] evaluates at "
      "another threat model; --config FILE and its overrides go with --torch_checkpoint"))


if __name__ == "__main__":
  run()
