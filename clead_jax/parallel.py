"""One 1-D 'data' mesh over all devices of all processes, and the shardings built on it.

The batch is sharded along 'data'; the train state is replicated. Under jit, XLA inserts the
collectives: gradients and BatchNorm statistics are reduced over the global batch, and the
InfoNCE similarity matrix sees every embedding of the global batch (cross-device negatives).

The mesh lists devices process by process, so process p's devices hold rows
[p * B / P, (p + 1) * B / P) of a global batch of B rows: the contiguous slice that
input_pipeline.local_batch gives process p, and the same global batch on any topology.
"""

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from clead_jax.errors import UserError


def process_major(devices):
  """Devices grouped by process, each process's in their given order."""
  return sorted(devices, key=lambda d: d.process_index)


def make_mesh() -> Mesh:
  return Mesh(np.asarray(process_major(jax.devices())), ("data",))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec("data"))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def check_global_batch(global_batch: int, field: str = "config.train.batch_size"):
  devices = jax.device_count()
  if global_batch <= 0 or global_batch % devices:
    raise UserError(f"{field}={global_batch} is not a positive multiple of the {devices} devices; "
                    f"set {field} to a multiple of {devices}")
  return global_batch // devices


def enable_compilation_cache(directory: str):
  """JAX's persistent compilation cache (config.compilation_cache_dir): a resumed run, a second
  evaluation of the same model and the runs of a study reuse the compiled steps and attacks."""
  if not directory:
    return
  jax.config.update("jax_compilation_cache_dir", os.path.expanduser(directory))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def usable_cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def use_cpu_cores_as_devices(count=None) -> int:
  """Makes JAX's CPU backend `count` devices (default: one per usable core) instead of one, so
  that evaluation, sharded over every device, runs one slice of each batch per core. On the 2-core
  CPU AutoAttack ran 1.26x faster so (the quickstart model; BENCHMARKS.md): one device spreads each
  small operation over both cores and waits for them. Results do not change: every evaluation's
  per-example result depends on the example's index only. Without effect on accelerators' devices,
  when XLA_FLAGS already sets the host device count, or for count <= 1. Must run before the first
  JAX operation; returns the count set (0: none)."""
  count = usable_cores() if count is None else int(count)
  if count <= 1 or "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
    return 0
  jax.config.update("jax_num_cpu_devices", count)
  return count
