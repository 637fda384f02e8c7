"""Data parallelism over a 1-D 'data' mesh gives the single-device computation.

The 8-device side runs in a subprocess (XLA_FLAGS must be set before jax is imported): this file
run as `python -m tests.test_parallel OUT_DIR` does every 8-device check, saves what it trained,
and the tests here compare it with the same training on one device.
"""

import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from clead_jax import input_pipeline
from clead_jax import losses
from clead_jax import objectives
from clead_jax import parallel
from clead_jax import train
from clead_jax.errors import UserError
from tests.conftest import REPO, digits_config

FAKE_DEVICES = 8
TRAIN_STEPS = 20


def _train(devices, num_steps=TRAIN_STEPS):
  """num_steps of digits C-LEAD on a mesh over `devices`: (params, batch_stats, losses)."""
  config = digits_config(**{"train.epochs": 2, "attack.steps": 3})
  dataset = input_pipeline.load_dataset(config.data)
  network, schedule, tx, _, _ = train.build(config, dataset)
  mesh = Mesh(np.asarray(devices), ("data",))
  replicated = parallel.replicated(mesh)
  state = jax.jit(lambda: train.create_train_state(network, tx, dataset.image_shape, config.seed),
                  out_shardings=replicated)()
  step_fn = train.make_train_step(objectives.Context(network, config),
                                  objectives.METHODS["clead"], tx, schedule)
  step_fn = train.jit_train_step(chex.assert_max_traces(step_fn, n=1), mesh)
  batches = input_pipeline.train_batches(dataset, config.train.batch_size, config.seed, 0,
                                         parallel.batch_sharding(mesh))
  step_losses = []
  for _ in range(num_steps):
    state, metrics = step_fn(state, next(batches))
    step_losses.append(float(metrics["loss"]))
  to_numpy = lambda tree: jax.tree.map(np.asarray, tree)
  return to_numpy(state.params), to_numpy(state.batch_stats), np.asarray(step_losses)


def _info_nce_sharded_vs_single(positives):
  """InfoNCE and its gradient with z sharded over all devices vs on one device."""
  rng = np.random.default_rng(0)
  n = 8 * FAKE_DEVICES
  z_clean, z_adv = (rng.normal(size=(n, 16)).astype(np.float32) for _ in range(2))
  z_clean /= np.linalg.norm(z_clean, axis=-1, keepdims=True)
  z_adv /= np.linalg.norm(z_adv, axis=-1, keepdims=True)
  labels = rng.integers(0, 5, size=n).astype(np.int32)
  value_and_grad = jax.value_and_grad(
      lambda zc, za, y: losses.info_nce(zc, za, y, 0.1, positives), argnums=(0, 1))
  mesh = parallel.make_mesh()
  data = parallel.batch_sharding(mesh)
  sharded_args = [jax.device_put(a, data) for a in (z_clean, z_adv, labels)]
  assert len(sharded_args[0].sharding.device_set) == FAKE_DEVICES
  sharded = jax.jit(value_and_grad, in_shardings=(data, data, data))(*sharded_args)
  one_device = jax.jit(value_and_grad)(*(jax.device_put(a, jax.devices()[0])
                                         for a in (z_clean, z_adv, labels)))
  for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(one_device)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  # The sharded loss really sees cross-device negatives: dropping them changes it.
  blocks = [slice(i * n // FAKE_DEVICES, (i + 1) * n // FAKE_DEVICES) for i in range(FAKE_DEVICES)]
  per_device = np.mean([float(losses.info_nce(z_clean[b], z_adv[b], labels[b], 0.1, positives))
                        for b in blocks])
  assert abs(per_device - float(sharded[0])) > 1e-3


def _interleave_needs_no_communication():
  """Interleaving clean/adversarial rows of a sharded batch keeps each pair on its device."""
  data = parallel.batch_sharding(parallel.make_mesh())
  x = jax.device_put(jnp.zeros((8 * FAKE_DEVICES, 8, 8, 1)), data)
  interleave = jax.jit(objectives._interleave, in_shardings=(data, data), out_shardings=data)  # pylint: disable=protected-access
  hlo = interleave.lower(x, x).compile().as_text()
  for collective in ("all-gather", "all-to-all", "collective-permute", "all-reduce"):
    assert collective not in hlo, collective


def _worker(out_dir):
  """The 8-device checks; writes the trained state to OUT_DIR/sharded.npz."""
  assert jax.device_count() == FAKE_DEVICES, jax.devices()
  for positives in losses.POSITIVES:
    _info_nce_sharded_vs_single(positives)
  _interleave_needs_no_communication()
  assert parallel.check_global_batch(128) == 16
  with pytest.raises(UserError, match="multiple of the 8 devices"):
    parallel.check_global_batch(100)
  params, batch_stats, step_losses = _train(jax.devices())
  flat = {f"params/{jax.tree_util.keystr(k)}": v
          for k, v in jax.tree_util.tree_leaves_with_path(params)}
  flat.update({f"batch_stats/{jax.tree_util.keystr(k)}": v
               for k, v in jax.tree_util.tree_leaves_with_path(batch_stats)})
  np.savez(os.path.join(out_dir, "sharded.npz"), losses=step_losses, **flat)


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
  """Runs _worker on 8 fake CPU devices; returns its saved arrays."""
  out_dir = str(tmp_path_factory.mktemp("eight_devices"))
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={FAKE_DEVICES}")
  proc = subprocess.run([sys.executable, "-m", "tests.test_parallel", out_dir], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  with np.load(os.path.join(out_dir, "sharded.npz")) as saved:
    return dict(saved)


def test_eight_device_checks_pass(eight_devices):
  """InfoNCE with cross-device negatives = one-device InfoNCE (value and gradient, every
  positives mode); interleaving needs no collective; a batch 8 does not divide is an error."""
  assert "losses" in eight_devices


def test_eight_devices_train_like_one(eight_devices):
  params, batch_stats, step_losses = _train(jax.devices()[:1])
  np.testing.assert_allclose(eight_devices["losses"], step_losses, rtol=1e-4, atol=1e-5)
  flat = {f"params/{jax.tree_util.keystr(k)}": v
          for k, v in jax.tree_util.tree_leaves_with_path(params)}
  flat.update({f"batch_stats/{jax.tree_util.keystr(k)}": v
               for k, v in jax.tree_util.tree_leaves_with_path(batch_stats)})
  assert set(flat) == set(eight_devices) - {"losses"}
  worst = max(float(np.max(np.abs(flat[k] - eight_devices[k]))) for k in flat)
  assert worst < 1e-4, f"max |params_1 - params_8| = {worst}"
  # The comparison can fail: 20 steps move the parameters far more than the tolerance.
  initial = _train(jax.devices()[:1], num_steps=0)[0]
  moved = max(float(np.max(np.abs(a - b)))
              for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(initial)))
  assert moved > 100 * 1e-4


class _FakeDevice:

  def __init__(self, process_index, device_id):
    self.process_index, self.id = process_index, device_id


def test_mesh_groups_devices_by_process():
  """Process p's devices take the p-th block of the mesh, the rows local_batch gives it."""
  devices = [_FakeDevice(p, i) for i, p in enumerate([1, 0, 1, 0, 0, 1])]
  ordered = parallel.process_major(devices)
  assert [d.process_index for d in ordered] == [0, 0, 0, 1, 1, 1]
  assert [d.id for d in ordered] == [1, 3, 4, 0, 2, 5]  # each process keeps its own order


def test_local_batches_tile_the_global_batch():
  images, labels = np.arange(40)[:, None], np.arange(40)
  indices = input_pipeline.global_batch_indices(40, 16, seed=0, step=3)
  parts = [input_pipeline.local_batch(images, labels, indices, p, 4)["label"] for p in range(4)]
  np.testing.assert_array_equal(np.concatenate(parts), indices)


if __name__ == "__main__":
  _worker(sys.argv[1])
