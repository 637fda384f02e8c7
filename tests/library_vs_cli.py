"""The library path against the CLI on a trained workdir, by hand (a few minutes on a CPU):

  python -m clead_jax.evaluate --workdir runs/digits --attacks=autoattack
  python -m tests.library_vs_cli runs/digits

on a CPU-only machine first makes one CPU device per core, as evaluate does by default and as the
README tells library users to (`jax.config.update("jax_num_cpu_devices", ...)`); then it
evaluates the workdir's evaluated weights (the averaged ones when EMA is on) with
clead_jax.robustness.evaluate on the same test points as the workdir's report, then prints whether
the per-example flags (clean, AutoAttack and each stage) equal those in DIR/report_examples.npz,
and both AutoAttack times (compilation included, each in its own process). Exit 1 if they differ.
"""

import sys
import time

import jax
import numpy as np


def main(workdir):
  # pylint: disable=g-import-not-at-top
  from clead_jax import input_pipeline
  from clead_jax import models
  from clead_jax import parallel
  from clead_jax import report as report_lib
  from clead_jax import robustness
  from clead_jax import train_state
  from clead_jax.evaluation import workdir as workdir_lib
  parallel.use_cpu_cores_as_devices()  # before the first JAX operation, as evaluate
  report = report_lib.read_examples(workdir)
  cli = workdir_lib.load_config(workdir)
  with open(f"{workdir}/report.json") as f:
    import json
    written = json.load(f)
  n = written["num_examples"]
  dataset = input_pipeline.load_dataset(cli.data)
  model = train_state.build(cli, dataset)
  state, _, _ = workdir_lib.restore_checkpoint(workdir, cli, model, parallel.make_mesh())
  variables = jax.device_get(workdir_lib.evaluated_variables(state, cli))
  def logits(params, x):  # the CLI's function: its Evaluator traces the network so
    with models.evaluation_pooling():
      return model.network.apply(params, x, train=False)[0]
  start = time.time()
  result = robustness.evaluate(logits, dataset.test_images[:n], dataset.test_labels[:n],
                               epsilon=cli.attack.epsilon, norm=cli.attack.norm,
                               attacks=("autoattack",), batch_size=cli.eval.batch_size,
                               seed=cli.seed, params=variables, progress=False)
  seconds = time.time() - start
  keys = ["clean", "autoattack"] + sorted(k for k in report if k.startswith("autoattack/"))
  same = {k: bool(np.array_equal(result.flags[k], report[k])) for k in keys}
  for key in keys:
    print(f"{key}: library {int(result.flags[key].sum())}, CLI {int(report[key].sum())} of {n}; "
          f"per-example flags {'equal' if same[key] else 'DIFFER'}")
  print(f"AutoAttack seconds (compilation included): library {result.report['attack_time_s']['autoattack']:.1f} "
        f"(whole call {seconds:.1f}), CLI {written['attack_time_s']['autoattack']:.1f}")
  return 0 if all(same.values()) else 1


if __name__ == "__main__":
  sys.exit(main(sys.argv[1]))
