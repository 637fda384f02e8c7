"""Data parallelism over a 1-D 'data' mesh gives the single-device computation.

The checks run in a subprocess with 8 fake CPU devices (XLA_FLAGS must be set before jax is
imported): this file run as `python -m tests.test_parallel OUT_DIR` compares InfoNCE and 20
C-LEAD train steps on all 8 devices with the same on one of them (a mesh of one device compiles
the one-device program) and writes the comparison for the tests below.
"""

import json
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
from clead_jax import methods
from clead_jax import parallel
from clead_jax import train
from clead_jax import train_state
from clead_jax.errors import UserError
from tests.conftest import REPO, digits_config

FAKE_DEVICES = 8
TRAIN_STEPS = 20


def _max_abs_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _lockstep(num_steps=TRAIN_STEPS):
  """num_steps of digits C-LEAD on one device; each step also runs on all devices from the same
  state and batch. Returns per-step max |one - all| of the new state and the loss, how far the
  parameters moved, and whether every step consumed (donated) its input state."""
  config = digits_config(**{"train.epochs": 2, "attack.steps": 3})
  dataset = input_pipeline.load_dataset(config.data)
  model = train_state.build(config, dataset)
  network, schedule, tx = model.network, model.schedule, model.tx
  ctx = methods.Context(network, config)
  # One trace per mesh: no step retraces.
  step_fn = chex.assert_max_traces(
      train.make_train_step(ctx, methods.METHODS["clead"], tx, schedule), n=2)
  steps, batches = {}, {}
  for name, devices in (("one", jax.devices()[:1]), ("all", jax.devices())):
    mesh = Mesh(np.asarray(devices), ("data",))
    steps[name] = (train.jit_train_step(step_fn, mesh), parallel.replicated(mesh))
    batches[name] = input_pipeline.train_batches(dataset, config.train.batch_size, config.seed, 0,
                                                 parallel.batch_sharding(mesh))
  state = jax.device_get(train_state.init_state(model, config.seed,
                                                Mesh(np.asarray(jax.devices()[:1]), ("data",))))
  initial_params = state.params
  diffs = {"params": [], "batch_stats": [], "opt_state": [], "loss": []}
  donated = []
  for _ in range(num_steps):
    new = {}
    for name, (step_fn, replicated) in steps.items():
      state_in = jax.device_put(state, replicated)
      new_state, metrics = step_fn(state_in, next(batches[name]))
      donated += [leaf.is_deleted() for leaf in jax.tree.leaves(state_in)]
      new[name] = jax.device_get((new_state, metrics["loss"]))
    (one, one_loss), (every, every_loss) = new["one"], new["all"]
    for field in ("params", "batch_stats", "opt_state"):
      diffs[field].append(_max_abs_diff(getattr(one, field), getattr(every, field)))
    diffs["loss"].append(abs(float(one_loss) - float(every_loss)))
    state = one
  return {"diffs": diffs, "moved": _max_abs_diff(state.params, initial_params),
          "all_donated": all(donated)}


def _info_nce_sharded_vs_single():
  """InfoNCE and its gradient, every positives mode, with z sharded over all devices vs on one."""
  rng = np.random.default_rng(0)
  n = 8 * FAKE_DEVICES
  z_clean, z_adv = (rng.normal(size=(n, 16)).astype(np.float32) for _ in range(2))
  z_clean /= np.linalg.norm(z_clean, axis=-1, keepdims=True)
  z_adv /= np.linalg.norm(z_adv, axis=-1, keepdims=True)
  labels = rng.integers(0, 5, size=n).astype(np.int32)

  def values_and_grads(zc, za, y):
    return {p: jax.value_and_grad(lambda c, a: losses.info_nce(c, a, y, 0.1, p), argnums=(0, 1))(
        zc, za) for p in losses.POSITIVES}

  data = parallel.batch_sharding(parallel.make_mesh())
  sharded_args = [jax.device_put(a, data) for a in (z_clean, z_adv, labels)]
  assert len(sharded_args[0].sharding.device_set) == FAKE_DEVICES
  sharded = jax.jit(values_and_grads, in_shardings=(data, data, data))(*sharded_args)
  one_device = jax.jit(values_and_grads)(*(jax.device_put(a, jax.devices()[0])
                                           for a in (z_clean, z_adv, labels)))
  for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(one_device)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  # The sharded loss really sees cross-device negatives: without them it differs.
  blocks = lambda a: a.reshape((FAKE_DEVICES, -1) + a.shape[1:])  # device d's rows
  per_device = jax.jit(jax.vmap(lambda zc, za, y: {
      p: losses.info_nce(zc, za, y, 0.1, p) for p in losses.POSITIVES}))(
          blocks(z_clean), blocks(z_adv), blocks(labels))
  for p in losses.POSITIVES:
    assert abs(float(np.mean(per_device[p])) - float(sharded[p][0])) > 1e-3, p


def _interleave_needs_no_communication():
  """Interleaving clean/adversarial rows of a sharded batch keeps each pair on its device."""
  data = parallel.batch_sharding(parallel.make_mesh())
  x = jax.device_put(jnp.zeros((8 * FAKE_DEVICES, 8, 8, 1)), data)
  interleave = jax.jit(methods._interleave, in_shardings=(data, data), out_shardings=data)  # pylint: disable=protected-access
  hlo = interleave.lower(x, x).compile().as_text()
  for collective in ("all-gather", "all-to-all", "collective-permute", "all-reduce"):
    assert collective not in hlo, collective


def _worker(out_dir):
  """The 8-device checks; writes the lockstep comparison to OUT_DIR/lockstep.json."""
  assert jax.device_count() == FAKE_DEVICES, jax.devices()
  _info_nce_sharded_vs_single()
  _interleave_needs_no_communication()
  assert parallel.check_global_batch(128) == 16
  with pytest.raises(UserError, match="multiple of the 8 devices"):
    parallel.check_global_batch(100)
  with open(os.path.join(out_dir, "lockstep.json"), "w") as f:
    json.dump(_lockstep(), f)


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
  """Runs _worker on 8 fake CPU devices (it asserts as it goes); returns its lockstep.json."""
  out_dir = str(tmp_path_factory.mktemp("eight_devices"))
  # LLVM optimisation off: 5x faster compiles, same HLO; these programs run for milliseconds.
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={FAKE_DEVICES} "
                       "--xla_backend_optimization_level=0")
  proc = subprocess.run([sys.executable, "-m", "tests.test_parallel", out_dir], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  with open(os.path.join(out_dir, "lockstep.json")) as f:
    return json.load(f)


def test_cross_device_infonce_and_sharding_checks(eight_devices):
  """InfoNCE with cross-device negatives = one-device InfoNCE (value and gradient, every
  positives mode); interleaving needs no collective; a batch 8 does not divide is an error."""
  assert eight_devices


def test_eight_devices_train_like_one(eight_devices):
  """Each of 20 C-LEAD steps gives the same state on 8 devices as on one, to float32 round-off.

  The steps run in lockstep from the one-device state: independent 20-step runs are no test of
  sharding, since this training is chaotic (two one-device runs whose initial parameters differ
  by 1e-7 end 1e-2 apart after 20 steps: PGD's sign, ReLU and max-pool kinks amplify round-off).
  """
  diffs = eight_devices["diffs"]
  assert len(diffs["params"]) == TRAIN_STEPS
  for field in ("params", "batch_stats", "opt_state"):
    assert max(diffs[field]) < 1e-4, (field, diffs[field])
  assert max(diffs["loss"]) < 1e-4, diffs["loss"]
  # The comparison can fail: the 20 steps move the parameters far more than the tolerance.
  assert eight_devices["moved"] > 100 * 1e-4
  assert eight_devices["all_donated"]  # the step reuses the state's buffers


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
