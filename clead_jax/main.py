"""Entry point: python -m clead_jax.main --config configs/digits.py --workdir runs/digits

Any config field can be overridden: --config.method=trades --config.train.epochs=5.
Multi-process runs: see clead_jax/distributed.py and launch/.
"""

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from clead_jax.errors import UserError

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
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # keep Orbax's INFO lines out of the progress bar
  from clead_jax import distributed  # pylint: disable=g-import-not-at-top
  from clead_jax import train  # pylint: disable=g-import-not-at-top
  try:
    distributed.initialize(_COORDINATOR_ADDRESS.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)  # a stop by SIGTERM also exits 0
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def parse_flags(argv):
  """absl's parser, with a bad flag value (e.g. a config override of the wrong type) reported as
  one line and exit code 2 instead of a usage dump."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"error: {e}; pass a value of the field's type (see clead_jax/default_config.py)",
          file=sys.stderr)
    sys.exit(2)


def run():
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
