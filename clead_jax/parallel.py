"""One 1-D 'data' mesh over all devices of all processes, and the shardings built on it.

The batch is sharded along 'data'; the train state is replicated. Under jit, XLA inserts the
collectives: gradients and BatchNorm statistics are reduced over the global batch, and the
InfoNCE similarity matrix sees every embedding of the global batch (cross-device negatives).

The mesh lists devices process by process, so process p's devices hold rows
[p * B / P, (p + 1) * B / P) of a global batch of B rows: the contiguous slice that
input_pipeline.local_batch gives process p, and the same global batch on any topology.
"""

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
