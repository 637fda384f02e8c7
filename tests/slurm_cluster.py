"""A real one-node SLURM on this machine for the tests: munged, slurmctld and slurmd started in a
temporary directory (their own key, socket, ports, state and logs), stopped afterwards.

Needs Debian's `slurm-wlm` and `munge` packages and root (slurmd runs jobs as their user); the
fixture skips with the install command where they are missing.
"""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time

import pytest

INSTALL = "apt-get install -y slurm-wlm munge"
_TOOLS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo")


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _config(root, host, cpus, memory_mb):
  return "\n".join([
      "ClusterName=clead_test",
      f"SlurmctldHost={host}",
      f"SlurmctldPort={_free_port()}",
      f"SlurmdPort={_free_port()}",
      "AuthType=auth/munge",
      f"AuthInfo=socket={root}/munge/munge.socket",
      "CredType=cred/munge",
      "SlurmUser=root",
      "SlurmdUser=root",
      f"StateSaveLocation={root}/state",
      f"SlurmdSpoolDir={root}/spool",
      f"SlurmctldPidFile={root}/slurmctld.pid",
      f"SlurmdPidFile={root}/slurmd.pid",
      f"SlurmctldLogFile={root}/log/slurmctld.log",
      f"SlurmdLogFile={root}/log/slurmd.log",
      # No cgroups (a container may not delegate them): processes are tracked by their parents.
      "ProctrackType=proctrack/linuxproc",
      "TaskPlugin=task/none",
      "JobAcctGatherType=jobacct_gather/none",
      "AccountingStorageType=accounting_storage/none",
      "SelectType=select/cons_tres",
      "SelectTypeParameters=CR_CPU",
      "MpiDefault=none",
      "ReturnToService=2",
      "SchedulerType=sched/backfill",
      "KillWait=60",  # a cancelled task has this long to save its checkpoint after SIGTERM
      f"NodeName={host} CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN",
      "PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
      ""])


def _pid(path):
  try:
    with open(path) as f:
      return int(f.read().strip())
  except (OSError, ValueError):
    return None


@contextlib.contextmanager
def cluster(root):
  """Starts the daemons under `root`; yields the environment in which sbatch and friends talk
  to them (SLURM_CONF); stops them (and cancels every job) on exit."""
  missing = [tool for tool in _TOOLS if shutil.which(tool) is None]
  if missing:
    pytest.skip(f"a real SLURM needs {', '.join(missing)}: {INSTALL}")
  if os.geteuid() != 0:
    pytest.skip("the one-node SLURM runs its daemons as root")
  root = str(root)
  for sub in ("munge", "state", "spool", "log"):
    os.makedirs(os.path.join(root, sub), exist_ok=True)
  key = os.path.join(root, "munge", "munge.key")
  with open(key, "wb") as f:
    f.write(os.urandom(1024))
  os.chmod(key, 0o400)
  subprocess.run(["munged", f"--key-file={key}", f"--socket={root}/munge/munge.socket",
                  f"--pid-file={root}/munge/munged.pid", f"--log-file={root}/munge/munged.log",
                  f"--seed-file={root}/munge/seed", "--force"], check=True, timeout=30)
  conf = os.path.join(root, "slurm.conf")
  host = socket.gethostname().split(".")[0]
  with open(conf, "w") as f:
    f.write(_config(root, host, os.cpu_count() or 1, 4096))
  env = dict(os.environ, SLURM_CONF=conf)
  try:
    subprocess.run(["slurmctld", "-f", conf], check=True, env=env, timeout=30)
    subprocess.run(["slurmd", "-f", conf], check=True, env=env, timeout=30)
    wait(lambda: "idle" in subprocess.run(["sinfo", "-h", "-o", "%T"], env=env,
                                          capture_output=True, text=True).stdout,
         60, "the SLURM node to be idle")
    yield env
  finally:
    subprocess.run(["scancel", "--full", "--user=root"], env=env, capture_output=True,
                   timeout=30, check=False)
    for name in ("slurmd.pid", "slurmctld.pid", os.path.join("munge", "munged.pid")):
      pid = _pid(os.path.join(root, name))
      if pid:
        with contextlib.suppress(ProcessLookupError):
          os.kill(pid, signal.SIGTERM)


def wait(condition, timeout_s, what):
  deadline = time.time() + timeout_s
  while not condition():
    if time.time() > deadline:
      raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
    time.sleep(0.2)


def queue(env):
  """The job steps SLURM still holds (pending or running), as 'jobid state' lines."""
  out = subprocess.run(["squeue", "-h", "-o", "%i %T"], env=env, capture_output=True, text=True,
                       check=True).stdout
  return [line for line in out.splitlines() if line.strip()]
