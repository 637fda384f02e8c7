"""One writer per workdir, and every path a command will write probed before the work.

A command that writes into a workdir (training, evaluate, crosscheck, a study and each of its runs)
holds an exclusive lock on DIR/clead_jax.lock (a study's summary writer: DIR/study_<sweep
fields>.lock, one per summary) for as long as its process lives: fcntl.flock, which
the kernel drops when the process ends however it ends, so a killed run never leaves a stale lock.
The holder writes its pid and command into the file; a second process reads them and stops with
one line (UserError: exit 2) before it writes anything. The file itself stays (it is never the
lock, only where the holder is named).

Locks are taken by command processes only (command_line.run enables them): a program that calls
the library, such as the test suite training in-process, decides for itself. In a multi-process
run only process 0 takes the lock; the others write nothing of their own into the workdir.

A leaf module (it imports only errors).
"""

import errno
import fcntl
import os
import shlex
import sys
import tempfile
import time

from clead_jax.errors import UserError

LOCK_FILE = "clead_jax.lock"

_enabled = False
_held = {}  # real path of a lock file -> its open file, held until the process ends


def enable():
  """Called once by every command process: from now on, acquire() takes locks."""
  global _enabled
  _enabled = True


def _command():
  """This process's command as a user typed it: python -m MODULE ... or the console script."""
  spec = getattr(sys.modules.get("__main__"), "__spec__", None)
  program = (["python", "-m", spec.name.removesuffix(".__main__")] if spec
             else [os.path.basename(sys.argv[0])])
  return shlex.join(program + sys.argv[1:])


def _holder(path):
  """'pid N: COMMAND' of the lock file's holder (it may still be writing it: wait a moment)."""
  text = ""
  for _ in range(20):
    try:
      with open(path) as f:
        text = f.read().strip()
    except OSError:
      pass
    if text:
      break
    time.sleep(0.05)
  pid, _, command = text.partition("\n")
  return f"pid {pid}: {command}" if pid else "a process that has not named itself yet"


def acquire(workdir, flag="--workdir", lock_file=LOCK_FILE):
  """Holds DIR's lock until this process ends; a no-op outside command processes, for a lock
  this process holds already, or for a workdir that does not exist (the command creates it later
  and takes the lock then). UserError when another process holds it or DIR is not writable.
  lock_file: another lock of DIR (a study's summary writer locks DIR/<summary>.lock, so that
  studies of other sweeps can share DIR and its finished runs)."""
  if not _enabled or not os.path.isdir(workdir):
    return
  path = os.path.join(workdir, lock_file)
  key = os.path.realpath(path)
  if key in _held:
    return
  try:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    raise UserError(_unwritable(workdir, flag, e)) from None
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    os.close(fd)
    if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
      raise
    raise UserError(f"{flag} {workdir} is in use by another process ({_holder(path)}); wait for "
                    "it to finish or stop it, or use another workdir (one writer per workdir)"
                    ) from None
  os.ftruncate(fd, 0)
  os.write(fd, f"{os.getpid()}\n{_command()}\n".encode())
  _held[key] = fd


def _unwritable(path, flag, error):
  cause = error.strerror or str(error)
  return (f"{flag} {path} is not writable ({cause.lower()}); make it writable or choose "
          "another path (nothing was computed)")


def check_writable(path, flag, directory=True):
  """UserError unless the directory `path` (directory=True) or the directory of the file `path`
  can be written; a directory that does not exist yet counts as its nearest existing parent,
  where it will be created. Probes by creating and removing a temporary file."""
  target = path if directory else (os.path.dirname(os.path.abspath(path)) or ".")
  target = os.path.abspath(os.path.expanduser(target))
  probe = target
  while not os.path.exists(probe):
    probe = os.path.dirname(probe)
  if not os.path.isdir(probe):
    raise UserError(f"{flag} {path}: {probe} is a file, not a directory; choose another path")
  try:
    with tempfile.TemporaryFile(dir=probe, prefix=".clead_jax_write_test"):
      pass
  except OSError as e:
    shown = path if probe == target else f"{path} (its parent {probe})"
    raise UserError(_unwritable(shown, flag, e)) from None
