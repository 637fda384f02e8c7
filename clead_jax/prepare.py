"""Prepares a TFDS dataset offline from local files: python -m clead_jax.prepare DATASET
(console script: clead-prepare).

  apt-get install dataset-fashion-mnist            # Debian's copy of the four IDX files
  python -m clead_jax.prepare fashion_mnist        # finds them through dpkg
  python -m clead_jax.prepare fashion_mnist --from DIR [--data_dir ~/tensorflow_datasets]

Writes the same TFDS dataset that TFDS's own builder downloads and prepares (see
clead_jax/tfds_offline.py) into --data_dir (TFDS's default directory when unset), where
`--config.data.data_dir` (or TFDS's default) finds it. Preparing an already prepared dataset does
nothing.
"""

import os
import time

from absl import flags

from clead_jax import command_line
from clead_jax.errors import UserError


def _define_flags():
  flags.DEFINE_string("from", None,
                      "Directory holding the original files (default: Debian's package's).")
  flags.DEFINE_string("data_dir", "", "TFDS data_dir to write into (default: TFDS's own, "
                      "$TFDS_DATA_DIR or ~/tensorflow_datasets).")


def main(argv):
  command_line.start(argv, positional=1)
  from clead_jax import tfds_offline  # pylint: disable=g-import-not-at-top  (after the flags)
  with command_line.user_errors_as_one_line():
    if len(argv) < 2:
      raise UserError("name the dataset to prepare: python -m clead_jax.prepare "
                      f"{' | '.join(sorted(tfds_offline.PREPARERS))} [--from DIR]")
    name = argv[1]
    if name not in tfds_offline.PREPARERS:
      raise UserError(f"dataset {name!r} cannot be prepared offline; choose one of "
                      f"{sorted(tfds_offline.PREPARERS)}")
    source = tfds_offline.find_source(flags.FLAGS["from"].value)
    # TFDS's own default: $TFDS_DATA_DIR, else ~/tensorflow_datasets.
    data_dir = os.path.expanduser(flags.FLAGS["data_dir"].value
                                  or os.environ.get("TFDS_DATA_DIR")
                                  or os.path.join("~", "tensorflow_datasets"))
    from clead_jax import workdir_lock  # pylint: disable=g-import-not-at-top
    workdir_lock.check_writable(data_dir, "--data_dir" if flags.FLAGS["data_dir"].value
                                else "TFDS's data_dir")
    start = time.time()
    written = tfds_offline.PREPARERS[name](source, data_dir)
    print(f"clead_jax.prepare: {name} from {source} is prepared in {written} "
          f"({time.time() - start:.1f} s); train with --config.data.data_dir={data_dir}",
          flush=True)


def run():
  command_line.run(main, _define_flags, __doc__)


if __name__ == "__main__":
  run()
