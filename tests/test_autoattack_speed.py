"""AutoAttack's speed-ups change nothing but the time.

The Runner sizes each stage's batches for that stage's points (sharded.tight_size, not a size
kept from the stage before), and on CPU the models' 2x2 max pooling is models.max_pool_2x2 (a max
over the window's taps, with nn.max_pool's gradient) instead of XLA's reduce_window. The old path
is both undone here: the per-example robust flags after every stage must be the same, and the
new path must make fewer passes through the network (counted, as the benchmark counts them).
"""

import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clead_jax import input_pipeline
from clead_jax import models
from clead_jax import parallel
from clead_jax import train_state
from clead_jax.bench import autoattack_workdir
from clead_jax.evaluation import autoattack_runner
from clead_jax.evaluation import sharded
from clead_jax.evaluation import suite
from clead_jax.evaluation import workdir as workdir_lib

NUM_EXAMPLES = 80
EPSILON = 0.05  # the session's model is trained cleanly: at 0.2 APGD-CE would leave nothing
SETTINGS = {"n_iter": 15, "fab_iter": 15, "n_queries": 100}


def _xla_max_pool(x):
  return nn.max_pool(x, (2, 2), strides=(2, 2))


def test_max_pool_2x2_has_nn_max_pool_values_and_gradients_with_ties():
  rng = np.random.default_rng(0)
  for shape in [(3, 8, 8, 4), (2, 7, 9, 3)]:  # odd sizes: VALID pooling drops the last row/column
    # ReLU plateaus: most windows hold ties, whose gradient must go to the first maximum only.
    x = jnp.asarray(np.maximum(rng.integers(-2, 3, size=shape), 0).astype(np.float32))
    weights = jnp.asarray(rng.normal(size=(shape[0], shape[1] // 2, shape[2] // 2, shape[3])),
                          jnp.float32)
    ours = lambda x: jnp.sum(models.max_pool_2x2(x) * weights)
    xla = lambda x: jnp.sum(_xla_max_pool(x) * weights)
    np.testing.assert_array_equal(models.max_pool_2x2(x), _xla_max_pool(x))
    np.testing.assert_array_equal(jax.jit(jax.grad(ours))(x), jax.jit(jax.grad(xla))(x))
    assert np.sum(jax.grad(ours)(x) != 0) == weights.size - np.sum(weights == 0)


def test_tight_size_pads_only_to_the_device_count():
  assert sharded.tight_size(229, 360, 1) == 229
  assert sharded.tight_size(229, 360, 2) == 230
  assert sharded.tight_size(229, 228, 2) == 228  # never above the batch size
  assert sharded.tight_size(17, 256, 8) == 24
  assert sharded.bucket(229, 360, 1) == 270  # what map_examples pads other evaluations to


def test_counting_network_counts_forward_and_backward_images():
  counter = autoattack_workdir.PassCounter()
  apply_fn = autoattack_workdir.counting_apply(lambda v, x: (x * v, x), counter)
  x = jnp.ones((5, 3))
  jax.jit(lambda x: apply_fn(2.0, x)[0])(x).block_until_ready()
  jax.jit(jax.grad(lambda x: jnp.sum(apply_fn(2.0, x)[0])))(x).block_until_ready()
  jax.effects_barrier()
  assert counter.between(0, float("inf")) == {"forward": 10, "backward": 5}


@pytest.fixture(scope="module")
def digits(trained_digits):
  config, workdir, _ = trained_digits
  dataset = input_pipeline.load_dataset(config.data)
  model = train_state.build(config, dataset)
  mesh = parallel.make_mesh()
  state, _, _ = workdir_lib.restore_checkpoint(workdir, config, model, mesh)
  evaluator = suite.Evaluator(model.network, mesh, "linf", NUM_EXAMPLES, config.seed)
  return (evaluator, mesh, config.seed, state.variables, dataset.test_images[:NUM_EXAMPLES],
          dataset.test_labels[:NUM_EXAMPLES])


def _run(digits):
  """The Runner's result and its passes through the network."""
  evaluator, mesh, seed, variables, images, labels = digits
  counter = autoattack_workdir.PassCounter()
  runner = autoattack_runner.Runner(autoattack_workdir.counting_apply(evaluator.apply, counter),
                                    mesh, "linf", NUM_EXAMPLES, seed, **SETTINGS)
  result = runner.run(variables, images, labels, EPSILON)
  jax.effects_barrier()
  return result, counter.between(0, float("inf"))


@pytest.mark.slow
def test_old_and_new_path_give_the_same_flags_after_every_stage(digits, monkeypatch):
  new, new_passes = _run(digits)
  with monkeypatch.context() as patch:
    patch.setattr(models, "max_pool_2x2", _xla_max_pool)
    patch.setattr(sharded, "tight_size", sharded.bucket)
    old, old_passes = _run(digits)
  assert new.stage_names == old.stage_names == ["apgd_ce", "apgd_t", "fab_t", "square"]
  np.testing.assert_array_equal(new.clean, old.clean)
  for stage, new_flags, old_flags in zip(new.stage_names, new.robust_after, old.robust_after):
    np.testing.assert_array_equal(new_flags, old_flags, err_msg=stage)
  # Not a vacuous comparison: points survive APGD-CE and the later stages attack them.
  robust = new.robust_after.sum(axis=1)
  assert robust[0] >= 10, robust
  assert new.clean.sum() > robust[0], robust
  assert new_passes["forward"] < old_passes["forward"], (new_passes, old_passes)
  assert new_passes["backward"] < old_passes["backward"], (new_passes, old_passes)


def test_one_cpu_device_per_core_unless_xla_flags_say_otherwise():
  """evaluate's default (parallel.use_cpu_cores_as_devices), in fresh processes: one CPU device per
  usable core, N when given, none when XLA_FLAGS already sets the host device count."""
  code = ("import sys; from clead_jax import parallel; "
          "count = parallel.use_cpu_cores_as_devices(*[int(a) for a in sys.argv[1:]]); "
          "import jax; print(count, jax.device_count())")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  run = lambda args, env: subprocess.run([sys.executable, "-c", code] + args, env=env, check=True,
                                         capture_output=True, text=True).stdout.split()
  cores = parallel.usable_cores()
  assert run([], env) == ([str(cores), str(cores)] if cores > 1 else ["0", "1"])
  assert run(["3"], env) == ["3", "3"]
  forced = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=5")
  assert run([], forced) == ["0", "5"]


def test_evaluate_rejects_a_bad_cpu_devices_in_one_line(tmp_path):
  result = subprocess.run([sys.executable, "-m", "clead_jax.evaluate", "--workdir",
                           str(tmp_path / "run"), "--cpu_devices=0"], capture_output=True,
                          text=True)
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2 and len(lines) == 1, result.stderr
  assert "--cpu_devices=0 must be >= 1" in lines[0]
