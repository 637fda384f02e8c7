"""Pieces only the AutoAttack attacks share: random directions, target classes, the predictor,
and the restart loop that keeps, per example, the first run that fools the model. Norms,
projection and per-example keys are clead_jax/perturbation.py's.

Every attack here has the signature of clead_jax.attacks:
  attack(apply_fn, variables, x, y, key, *, epsilon, norm, ...) -> x_adv
with `key` one key per example (or one key, split per example). One *run* of an attack, as
each module's make_run(epsilon=..., norm=..., ...) builds it, is
  run(apply_fn, variables, x, y, keys, run_index) -> x_adv
where the run index (an integer, possibly traced) picks the restart and, for targeted attacks,
the target class.
"""

import math

import jax
import jax.numpy as jnp

from clead_jax import perturbation


def uniform(keys, shape, minval=0.0, maxval=1.0, dtype=jnp.float32):
  """Per-example uniform samples of `shape`: (B,) + shape. Drawn flat and reshaped, which XLA
  compiles several times faster than a multi-dimensional draw under vmap."""
  size = math.prod(shape)
  flat = jax.vmap(lambda k: jax.random.uniform(k, (size,), dtype, minval, maxval))(keys)
  return flat.reshape((keys.shape[0],) + tuple(shape))


def normal(keys, shape, dtype=jnp.float32):
  size = math.prod(shape)
  flat = jax.vmap(lambda k: jax.random.normal(k, (size,), dtype))(keys)
  return flat.reshape((keys.shape[0],) + tuple(shape))


def unit_direction(keys, shape, norm, dtype=jnp.float32):
  """A random direction of norm one per example: uniform in [-1, 1] rescaled to L-inf norm 1,
  or Gaussian rescaled to L2 norm 1 (the starting points of APGD and FAB in fra31/auto-attack)."""
  t = uniform(keys, shape, -1.0, 1.0, dtype) if norm == "linf" else normal(keys, shape, dtype)
  return t / perturbation.expand(jnp.maximum(perturbation.flat_norm(t, norm), 1e-12), t)


def target_classes(logits, rank):
  """The class with the `rank`-th largest logit (rank 2: the runner-up); rank may be traced."""
  order = jnp.argsort(logits, axis=-1)
  return jnp.take(order, logits.shape[-1] - rank, axis=-1)


def predictor(apply_fn, variables, sample_keys=None):
  """predict(x) -> labels; for a stochastic apply_fn(variables, x, keys), on the fixed sample
  that `sample_keys` (one key per example) selects."""
  def predict(x):
    logits, _ = (apply_fn(variables, x) if sample_keys is None
                 else apply_fn(variables, x, sample_keys))
    return jnp.argmax(logits, axis=-1)
  return predict


def num_classes_of(apply_fn, variables, x, stochastic=False):
  """The number of classes, from the logits' shape (nothing is computed)."""
  def logits(v, x_in):
    keys = jax.random.split(jax.random.key(0), x_in.shape[0])
    return (apply_fn(v, x_in, keys) if stochastic else apply_fn(v, x_in))[0]
  return jax.eval_shape(logits, variables, x[:1]).shape[-1]


def over_runs(run, num_runs, predict_fn, x, y, keys):
  """Runs run(x, y, keys, run_index) for run_index = 0..num_runs-1; returns (x_adv, robust).

  An example keeps the point of the first run that fools predict_fn; examples never fooled keep
  the last run's point. Every run sees the whole batch (masking, not gathering), so under jit
  its cost does not shrink as examples are fooled; clead_jax.evaluation.autoattack_runner gathers instead.
  """
  robust = predict_fn(x) == y

  def body(run_index, carry):
    x_adv, robust = carry
    x_run = run(x, y, perturbation.fold_in(keys, run_index), run_index)
    fooled = predict_fn(x_run) != y
    x_adv = jnp.where(perturbation.expand(robust, x), x_run, x_adv)
    return x_adv, robust & ~fooled

  return jax.lax.fori_loop(0, num_runs, body, (x, robust))
