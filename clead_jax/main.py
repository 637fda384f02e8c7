"""The training command: python -m clead_jax.main --config configs/digits.py --workdir runs/digits
(console script: clead-train).

Trains config.method, evaluates it and writes DIR/report.*; run again with the same workdir to
resume. Any config field can be overridden: --config.method=trades --config.train.epochs=5.
Multi-process runs: see clead_jax/distributed.py and launch/.
"""

from absl import flags
from ml_collections import config_flags

from clead_jax import command_line


def _define_flags():
  config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py), "
                                  "optionally :ARG for its get_config(ARG).", lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and reports.")
  # Multi-process runs; unset, they come from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
  # JAX_PROCESS_ID or from JAX's cluster detection (Cloud TPU, SLURM).
  flags.DEFINE_string("coordinator_address", None,
                      "host:port of process 0, the same on every process.")
  flags.DEFINE_integer("num_processes", None, "Number of processes.")
  flags.DEFINE_integer("process_id", None, "This process's index, 0..N-1.")


def main(argv):
  command_line.start(argv)
  command_line.require("config", "workdir")
  values = flags.FLAGS
  command_line.log_to(values.workdir)
  with command_line.user_errors_as_one_line():
    # pylint: disable=g-import-not-at-top  (after the flags and the signal handlers)
    from clead_jax import distributed
    from clead_jax import train
    distributed.initialize(values.coordinator_address, values.num_processes, values.process_id)
    train.train_and_evaluate(values.config, values.workdir)


def run():
  command_line.run(main, _define_flags, __doc__)


if __name__ == "__main__":
  run()
