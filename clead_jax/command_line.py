"""What the entry points (main, evaluate, study) share: flag parsing and error reporting.

Bad input is one line on stderr, `error: <cause and fix>`, and exit code 2; see errors.UserError.
"""

import contextlib
import sys

from absl import app
from absl import flags
from absl import logging

from clead_jax.errors import UserError


def _fail(message):
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def parse_flags(argv):
  """absl's parser, with a bad flag value (e.g. a config override of the wrong type) reported as
  one line and exit code 2 instead of a usage dump."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(f"{e}; pass a value of the flag's type (config fields: clead_jax/default_config.py)")


def start(argv):
  """Checks that no stray arguments follow the flags, and keeps Orbax's INFO lines out of the
  progress bars unless --verbosity asks for them."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


@contextlib.contextmanager
def user_errors_as_one_line():
  """A UserError raised inside becomes `error: <message>` on stderr and exit code 2."""
  try:
    yield
  except UserError as e:
    _fail(e)


def run(main):
  app.run(main, flags_parser=parse_flags)
