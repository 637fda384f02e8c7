"""What every command shares: flag parsing, one-line errors, stops by signal, help, the log file.

Bad input is one line on stderr, `error: <what, why, and the fix>`, and exit code 2 (see
errors.UserError): an unknown config field (with the nearest names), a missing or unreadable
config file, one that fails to import (the file, the line and the error), an override without
--config, a missing required flag, a value of the wrong type or out of range; a workdir another
process writes, a path that cannot be written (clead_jax/workdir_lock.py). A stop by SIGINT or SIGTERM is one line too (clead_jax/stopping.py): exit 0 when
work was kept, 130 or 143 when nothing had run yet.

Library noise (absl, Orbax and TensorStore logging, and what library threads write to stderr,
such as the tracebacks of a failed background checkpoint write) goes to DIR/clead_jax.log once the
command knows its directory; `--verbosity=0` (or higher) sends it to the terminal as well. A
full disk anywhere is one line too.
"""

import contextlib
import errno
import logging as python_logging
import os
import re
import sys
import threading

from absl import app
from absl import flags
from absl import logging

from clead_jax import stopping
from clead_jax import workdir_lock
from clead_jax.errors import UserError

LOG_FILE = "clead_jax.log"


def fail(message):
  stopping.end_progress_bars()
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(2)


def _config_overrides(argv):
  return [a.split("=", 1)[0][2:] for a in argv if a.startswith("--config.")]


def _has_config_flag(argv):
  return any(a == "--config" or a.startswith("--config=") for a in argv)


def _unknown_field_message(argv, missing=None):
  """The first override that names a field the config lacks, with the nearest real fields. The
  config is walked part by part (absl's own message nests escaped reprs)."""
  from clead_jax import config_tools  # pylint: disable=g-import-not-at-top
  from clead_jax import default_config  # pylint: disable=g-import-not-at-top
  base = default_config.get_base_config()
  for override in _config_overrides(argv):
    field = override.removeprefix("config.")
    node = base
    for part in field.split("."):
      if not hasattr(node, "keys") or part not in node:
        near = config_tools.nearest_fields(field, base)
        hint = f" (did you mean {', '.join('config.' + n for n in near)}?)" if near else ""
        return (f"--{override}: the config has no field {part!r}{hint}; every field and its "
                "meaning: --help, or clead_jax/default_config.py")
      node = node[part]
  return (f"the config has no field {missing!r}; see --help or clead_jax/default_config.py"
          if missing else "a --config.* override names no config field; see --help")


def _config_path(argv):
  """The file of --config FILE[:ARG] in argv, or None."""
  for i, arg in enumerate(argv):
    value = (argv[i + 1] if arg == "--config" and i + 1 < len(argv)
             else arg.split("=", 1)[1] if arg.startswith("--config=") else None)
    if value:
      return value.split(":", 1)[0]
  return None


def _same_file(a, b):
  try:
    return os.path.samefile(a, b)
  except OSError:
    return False


def _config_load_error(argv, error):
  """One line for a config file that failed to import or whose get_config raised: the file, the
  line and the error; None when `error` did not come from the config file's code."""
  path = _config_path(argv)
  chain, cause = [], error
  while cause is not None and len(chain) < 10:
    chain.append(cause)
    cause = cause.__cause__ or cause.__context__
  for exc in chain:
    if isinstance(exc, SyntaxError) and exc.lineno and _same_file(exc.filename or "", path or ""):
      return (f"--config {path}, line {exc.lineno}: the config file failed to load (SyntaxError: "
              f"{exc.msg}); fix the file")
  for exc in chain:
    line, tb = None, exc.__traceback__
    while tb is not None:
      if _same_file(tb.tb_frame.f_code.co_filename, path or ""):
        line = tb.tb_lineno
      tb = tb.tb_next
    if line is not None:
      message = str(exc).splitlines()[0] if str(exc) else ""
      return (f"--config {path}, line {line}: the config file failed to load "
              f"({type(exc).__name__}{': ' + message if message else ''}); fix the file (or "
              "the argument after ':')")
  return None


def parse_flags(argv):
  """absl's parser, with every bad flag reported as one line and exit code 2."""
  try:
    remaining = flags.FLAGS(argv)
    if "config" in flags.FLAGS and flags.FLAGS["config"].present:
      config = flags.FLAGS["config"].value
      if config is not None:  # a file that failed to load raises at its first use: use it now
        list(config.keys())
    return remaining
  except flags.UnrecognizedFlagError as e:
    name = getattr(e, "flagname", None) or str(e)
    if name.startswith("config.") and not _has_config_flag(argv):
      if _override_hint:
        fail(f"--{name}: {_override_hint}")
      fail(f"--{name} overrides a config field, but no --config FILE was given; put --config "
           "first, e.g. --config configs/digits.py --" + name)
    if name.startswith("config."):
      fail(_unknown_field_message(argv))
    fail(f"unknown flag --{name}; see --help")
  except SyntaxError as e:
    fail(_config_load_error(argv, e) or f"--config: {e}")
  except flags.Error as e:
    text = str(e)
    if "Error whilst parsing config file" in text:
      cause = [l.strip() for l in text.splitlines() if l.strip()][-1]
      fail(_config_load_error(argv, e) or (
          f"{text.splitlines()[0].rstrip(':').split(': Error')[0]}: the config file failed to "
          f"load ({cause}); check the file and the argument after ':'"))
    fail(f"{text.splitlines()[0]}; pass a value of the field's type (see --help)")
  except (KeyError, AttributeError) as e:
    fail(_config_load_error(argv, e) or _unknown_field_message(argv))
  except OSError as e:
    if _config_load_error(argv, e):
      fail(_config_load_error(argv, e))
    chain, cause = [], e  # ml_collections re-raises the loading error at first access
    while cause is not None:
      chain.append(str(cause))
      cause = cause.__cause__ or cause.__context__
    text = "\n".join(chain)
    path = re.search(r"Attempted \[[^]]*\]:\s*(\S+)", text)
    what = path.group(1) if path else "the config file"
    reason = re.search(r"\[Errno \d+\] ([^:']+)", text)
    fail(f"--config {what}: {reason.group(1).lower() if reason else 'cannot be read'}; pass the "
         "path of a config file, e.g. configs/digits.py")
  return None


def require(*names):
  """Required flags, checked after parsing with one line each (absl's message is cryptic)."""
  for name in names:
    if flags.FLAGS[name].value is None:
      fail(f"--{name} is required: {flags.FLAGS[name].help}")


def start(argv, positional=0):
  """No stray arguments after the flags; absl and Orbax INFO lines stay off the terminal unless
  --verbosity asks for them."""
  if len(argv) > 1 + positional:
    fail(f"unexpected arguments {argv[1 + positional:]}; see --help")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
    logging.set_stderrthreshold(logging.FATAL)


class _DirectoryLog(python_logging.Handler):
  """Appends to DIR/clead_jax.log once DIR exists (the command creates it when the work starts,
  so bad input leaves no directory behind); records before that wait in memory."""

  def __init__(self, directory):
    super().__init__()
    self.path = os.path.join(directory, LOG_FILE)
    self.waiting = []
    self.file = None
    self.closed = False

  def emit(self, record):
    if self.closed:
      return
    try:
      if self.file is None:
        if not os.path.isdir(os.path.dirname(self.path) or "."):
          self.waiting = (self.waiting + [self.format(record)])[-1000:]
          return
        self.file = open(self.path, "a")  # pylint: disable=consider-using-with
        for line in self.waiting:
          self.file.write(line + "\n")
        self.waiting = []
      self.file.write(self.format(record) + "\n")
      self.file.flush()
    except (OSError, ValueError):
      pass  # an unwritable directory the command reports itself; a file closed at exit

  def write_text(self, text):
    """Raw text, as it came (a library's traceback)."""
    record = python_logging.LogRecord("stderr", python_logging.WARNING, "", 0, text.rstrip("\n"),
                                      None, None)
    if text.strip():
      self.emit(record)

  def close(self):
    if self.file is not None:
      self.file.close()
      self.file = None
    self.closed = True  # library threads still logging at exit write nowhere
    super().close()


class _MainThreadStderr:
  """stderr for the main thread; what library threads write there (tensorstore's tracebacks of a
  failed background write, printed bypassing logging) goes to DIR/clead_jax.log instead."""

  def __init__(self, stream, log):
    self._stream, self._log = stream, log

  def write(self, text):
    if threading.current_thread() is threading.main_thread():
      return self._stream.write(text)
    self._log.write_text(text)
    return len(text)

  def __getattr__(self, name):
    return getattr(self._stream, name)


def log_to(directory):
  """absl/Python logging of this process to DIR/clead_jax.log."""
  handler = _DirectoryLog(directory)
  handler.setFormatter(python_logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
  root = python_logging.getLogger()
  root.addHandler(handler)
  if not flags.FLAGS["verbosity"].present:
    root.setLevel(python_logging.WARNING)
    # absl's handler writes WARNING and above to stderr while it has no log file of its own:
    # Orbax's tracebacks of a failed background save, for one. They go to DIR/clead_jax.log only.
    root.removeHandler(logging.get_absl_handler())
    sys.stderr = _MainThreadStderr(sys.stderr, handler)


@contextlib.contextmanager
def user_errors_as_one_line():
  """A UserError raised inside becomes `error: <message>` on stderr and exit code 2; a stop
  (stopping.Stopped) its one line and exit code."""
  try:
    yield
  except UserError as e:
    fail(e)
  except stopping.Stopped as stopped:
    stopping.report_and_exit(stopped)
  except OSError as e:
    if e.errno not in (errno.ENOSPC, errno.EDQUOT):
      raise
    fail(f"writing {e.filename or 'a file'} failed ({e.strerror}); free disk space or choose "
         "another --workdir, then rerun the same command: it resumes from the last checkpoint "
         "and keeps the report entries written so far")


_override_hint = None  # what a --config.* override without --config should say instead


def run(main, define_flags, usage=None, config_fields=True, override_hint=None):
  """Defines the command's flags, installs the signal handling (before JAX is imported), and
  runs main(argv) with one-line errors. `usage`: the text --help prints first; config_fields:
  whether --help lists every config field (a command whose --config is secondary says where
  they apply instead); override_hint: the error of a --config.* override without --config."""
  global _override_hint
  _override_hint = override_hint
  stopping.install()
  workdir_lock.enable()  # one writer per workdir: this process holds the ones it writes
  # TensorFlow (only TFDS uses it) logs start-up lines on stderr unless told not to.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  define_flags()
  if usage is not None and any(a in ("--help", "-h", "--helpshort", "--helpfull")
                               for a in sys.argv[1:]):
    from clead_jax import help_text  # pylint: disable=g-import-not-at-top
    print(help_text.render(usage, flags.FLAGS, config_fields))
    sys.exit(0)
  app.run(main, flags_parser=parse_flags)
