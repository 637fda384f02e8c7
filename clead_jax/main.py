"""Entry point: python -m clead_jax.main --config configs/digits.py --workdir runs/digits

Any config field can be overridden: --config.method=trades --config.train.epochs=5.
Multi-process runs: see clead_jax/distributed.py and launch/.
"""

from absl import flags
from ml_collections import config_flags

from clead_jax import command_line

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and reports.")
flags.mark_flags_as_required(["config", "workdir"])
# Multi-process runs; unset, they come from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
# JAX_PROCESS_ID or from JAX's cluster detection (Cloud TPU, SLURM).
_COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, the same on every process.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0..N-1.")


def main(argv):
  command_line.start(argv)
  from clead_jax import distributed  # pylint: disable=g-import-not-at-top
  from clead_jax import train  # pylint: disable=g-import-not-at-top
  with command_line.user_errors_as_one_line():
    distributed.initialize(_COORDINATOR_ADDRESS.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)  # a stop by SIGTERM also exits 0


def run():
  command_line.run(main)


if __name__ == "__main__":
  run()
