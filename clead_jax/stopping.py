"""SIGINT and SIGTERM as requests to stop at the next safe point, in every phase of a command.

Entry points call `install()` first thing, before JAX is imported. From then on a signal only
records itself: nothing is raised inside XLA compilation or a running computation (a
KeyboardInterrupt there once ended in a segmentation fault). The code checks at safe points:

  - the training loop after each step (it checkpoints, then stops);
  - the evaluation loops after each batch, and AutoAttack after each run of a stage (it saves
    its progress first), by calling `check()`, which raises `Stopped`;
  - the commands before and after compilation.

A second signal while the first is being handled ends the process at once (exit 128 + signal
number), for a user who does not want to wait for the current unit of work.
"""

import os
import signal
import sys
import threading

import numpy as np


class Stopped(Exception):
  """A stop was requested; `signal_name` says by which signal (or 'preemption')."""

  def __init__(self, signal_name, what_was_kept="", nothing_ran=False):
    super().__init__(signal_name)
    self.signal_name = signal_name
    self.what_was_kept = what_was_kept  # one clause: what is saved and how to go on
    self.nothing_ran = nothing_ran  # stopped before any unit of work (exit 128 + signal)


_received = []  # names of the signals received, in order
_elsewhere = []  # "SIGTERM to process 1": a signal another process of the run received


def _handle(signum, frame):
  del frame
  name = signal.Signals(signum).name
  _received.append(name)
  if len(_received) > 1:
    # os.write: no buffered I/O inside a signal handler.
    os.write(2, f"clead_jax: second {name}: exiting at once\n".encode())
    os._exit(128 + signum)  # pylint: disable=protected-access


def install():
  """Records SIGINT and SIGTERM instead of acting on them (main thread only)."""
  if threading.current_thread() is threading.main_thread():
    for sig in (signal.SIGINT, signal.SIGTERM):
      signal.signal(sig, _handle)


def reset():
  """Forgets received signals (tests that run several commands in one process)."""
  _received.clear()
  _elsewhere.clear()


def signal_name():
  """The first signal this process received, else the one another process of the run received
  ("SIGTERM to process 1"), or None."""
  if _received:
    return _received[0]
  return _elsewhere[0] if _elsewhere else None


def exit_code(name):
  """128 + the signal's number (130 for SIGINT, 143 for SIGTERM): a stop before any work."""
  return 128 + signal.Signals[name].value if name in signal.Signals.__members__ else 1


def requested(all_processes=True):
  """Whether a stop was requested. With several processes the answer is the same on all of them
  (one small all-gather), so that none is left waiting in a collective; JAX's preemption notice
  counts too."""
  local = signal.Signals[_received[0]].value if _received else 0
  if not all_processes:
    return bool(local)
  import jax  # pylint: disable=g-import-not-at-top  (installed before JAX is imported)
  if jax.process_count() == 1:
    return bool(local)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  numbers = np.asarray(multihost_utils.process_allgather(np.array([local], np.int32))).ravel()
  if not _received and not _elsewhere and numbers.any():
    index = int(np.flatnonzero(numbers)[0])
    _elsewhere.append(f"{signal.Signals(int(numbers[index])).name} to process {index}")
  return bool(numbers.any())


def requested_at_step(step):
  """requested(), also true at JAX's preemption sync point of a multi-process run (preemption
  notices that come through its coordination service)."""
  if requested():
    return True
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return False
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return multihost_utils.reached_preemption_sync_point(step)


def check(all_processes=True):
  """Raises Stopped at a safe point when a stop was requested."""
  if requested(all_processes):
    raise Stopped(signal_name() or "a signal to another process")


def end_progress_bars():
  """Closes the progress bars still drawn (a stop or an error can leave one mid-line), so that
  the line printed next starts a line of its own."""
  tqdm = sys.modules.get("tqdm")
  for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
    bar.close()


def report_and_exit(stopped: Stopped):
  """The one line a command prints when it stops, then the exit: 0 when work was kept, 128 +
  the signal's number when nothing had run yet. In a multi-process run only process 0 prints
  it (every process stopped at the same point)."""
  jax = sys.modules.get("jax")
  end_progress_bars()
  if jax is None or jax.process_index() == 0:
    print(f"clead_jax: stopped by {stopped.signal_name}; {stopped.what_was_kept}",
          file=sys.stderr, flush=True)
  sys.exit(exit_code(stopped.signal_name) if stopped.nothing_ran else 0)
