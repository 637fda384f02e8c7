"""The one loop that maps a sharded per-example function over examples of a split.

Every evaluation (clean accuracy, each attack, AutoAttack's stages, the gradient checks) goes
through `map_examples`: global example indices are cut into batches, each padded to a fixed size
and sharded over every device of every process; the outputs come back to every process as numpy.
Example i's randomness comes from its index (perturbation.example_keys), so neither the batch
size nor the device count changes a result. Between batches the loop is a safe point for a
requested stop (clead_jax/stopping.py).
"""

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from clead_jax import input_pipeline
from clead_jax import parallel
from clead_jax import stopping


def round_up_to_devices(batch_size, devices):
  return -(-batch_size // devices) * devices


def bucket(count, batch_size, devices):
  """The padded size of a batch of `count` examples: a multiple of an eighth of batch_size (and
  of the device count), so that few shapes, hence few compilations, occur."""
  granule = -(-batch_size // (8 * devices)) * devices
  return min(-(-count // granule) * granule, batch_size)


def tight_size(count, batch_size, devices):
  """The padded size of a batch of `count` examples that one compilation serves for long (an
  AutoAttack stage): the next multiple of the device count, at most batch_size."""
  return min(-(-count // devices) * devices, batch_size)


def chunk_length(count, batch_size):
  """Examples per batch when `count` examples are split evenly into batches of <= batch_size."""
  return -(-count // max(1, -(-count // batch_size)))


def map_examples(mesh, batch_size, fn, images, labels, indices, *args, size=None, length=None,
                 progress=None):
  """fn(images, labels, indices, *args) -> per-example array, over `indices` of a split.

  `indices` are global example indices, cut into batches of `length` examples (default: split
  evenly into batches of at most batch_size, a multiple of the device count), each padded to
  `size` (default: a bucket size) and sharded over the mesh. `progress`: a tqdm description.
  Returns a numpy array on every process.
  """
  if not len(indices):
    return np.zeros((0,), bool)
  sharding = parallel.batch_sharding(mesh)
  devices = mesh.devices.size
  process_index, process_count = jax.process_index(), jax.process_count()
  length = length or chunk_length(len(indices), batch_size)
  size = size or bucket(length, batch_size, devices)
  outputs = []
  starts = range(0, len(indices), length)
  for start in tqdm(starts, desc=progress, disable=progress is None, leave=False):
    stopping.check()
    chunk = indices[start:start + length]
    padded = np.concatenate([chunk, np.full(size - len(chunk), chunk[0], chunk.dtype)])
    host = input_pipeline.local_batch(images, labels, padded, process_index, process_count)
    host["indices"] = padded.reshape(process_count, -1)[process_index].astype(np.int32)
    batch = {k: jax.make_array_from_process_local_data(sharding, v) for k, v in host.items()}
    out = fn(batch["image"], batch["label"], batch["indices"], *args)
    if process_count > 1:
      out = multihost_utils.process_allgather(out, tiled=True)
    outputs.append(np.asarray(out)[:len(chunk)])
  return np.concatenate(outputs)
