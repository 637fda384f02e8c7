"""Joins the processes of a multi-process run: jax.distributed.initialize, when there are several.

Where the settings come from, first match wins:
  1. explicit arguments (main.py's --coordinator_address, --num_processes, --process_id);
  2. the environment: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID;
  3. JAX's own cluster detection (Cloud TPU VMs and GKE TPU pods, SLURM under srun, Open MPI,
     Kubernetes Indexed Jobs), which fills in whatever 1 and 2 left unset.
With none of these, the run is single-process and nothing is initialised.

Must run before any JAX computation. On CPU, collectives across processes go through gloo.
"""

import os
from typing import Optional

import jax

from clead_jax.errors import UserError

ENV_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def _env_int(name: str) -> Optional[int]:
  value = os.environ.get(name, "").strip()
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise UserError(f"environment variable {name}={value!r} is not an integer") from None


def resolve(coordinator_address=None, num_processes=None, process_id=None):
  """(coordinator_address, num_processes, process_id): arguments, else environment, else None."""
  if not os.environ.get("JAX_COORDINATOR_ADDRESS", "x").strip():
    del os.environ["JAX_COORDINATOR_ADDRESS"]  # set but empty: unset (JAX reads it too)
  if not coordinator_address:
    coordinator_address = os.environ.get("JAX_COORDINATOR_ADDRESS", "").strip() or None
  if coordinator_address and not coordinator_address.rpartition(":")[2].isdigit():
    raise UserError(f"coordinator address {coordinator_address!r} is not HOST:PORT")
  if num_processes is None:
    num_processes = _env_int("JAX_NUM_PROCESSES")
  if process_id is None:
    process_id = _env_int("JAX_PROCESS_ID")
  if num_processes is not None and num_processes < 1:
    raise UserError(f"--num_processes={num_processes} must be >= 1")
  if process_id is not None and not 0 <= process_id < (num_processes or process_id + 1):
    raise UserError(f"--process_id={process_id} must be in [0, --num_processes={num_processes})")
  return coordinator_address, num_processes, process_id


def initialize(coordinator_address=None, num_processes=None, process_id=None) -> bool:
  """Initialises JAX's distributed runtime when the run has several processes.

  Returns True when it did (or it already was), False for a single-process run.
  """
  coordinator_address, num_processes, process_id = resolve(
      coordinator_address, num_processes, process_id)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if jax.distributed.is_initialized():
    return True
  if num_processes == 1 or (num_processes is None and os.environ.get("SLURM_NTASKS") == "1"):
    # One process. (Under `srun -n 1`, JAX's SLURM detection would also hide all GPUs but one.)
    return False
  explicit = (coordinator_address, num_processes, process_id)
  try:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  except ValueError as e:
    if all(v is None for v in explicit):
      return False  # no cluster detected, nothing given: a single-process run
    missing = [f"--{env_var[4:].lower()} (or {env_var})"
               for env_var, value in zip(ENV_VARS, explicit) if value is None]
    raise UserError(f"multi-process run: {e} Set {', '.join(missing)} on every process") from None
  return True
