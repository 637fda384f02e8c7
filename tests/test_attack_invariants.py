"""Property tests: every attack's points lie in the epsilon-ball around x and in [0, 1], for any
epsilon, image shape and norm, including points on the box's faces and epsilons past the box.

The attacks run with few iterations (the invariants do not depend on how many) and are compiled
with XLA's cheapest backend optimisation: compiling, not running, is what these tests pay for.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import HealthCheck
from hypothesis import settings
from hypothesis import strategies as st

from clead_jax.autoattack import apgd
from clead_jax.autoattack import versions
from clead_jax.autoattack import fab
from clead_jax.autoattack import square

NUM_CLASSES = 5
SHAPES = ((3, 4, 4, 1), (2, 5, 3, 3), (4, 7))  # NHWC images, and flat inputs


def linear_apply(variables, x):
  logits = x.reshape(x.shape[0], -1) @ variables["w"] + variables["b"]
  return logits, logits


def noisy_apply(variables, x, keys):
  """A randomised model (for EoT): the linear model plus per-example logit noise."""
  logits, _ = linear_apply(variables, x)
  noise = jax.vmap(lambda k: jax.random.normal(k, (NUM_CLASSES,)))(keys)
  return logits + noise, logits


# name -> attack(apply_fn, variables, x, y, keys, *, epsilon, norm), each with the reference's
# structure (restarts, targets, stages, EoT) but few iterations.
ATTACKS = {
    "apgd_ce": functools.partial(apgd.apgd, loss="ce", n_iter=4),
    "apgd_t": functools.partial(apgd.apgd, loss="dlr", targeted=True, n_target_classes=2,
                                n_iter=4),
    "apgd_eot": functools.partial(apgd.apgd, loss="ce", eot_iter=3, stochastic=True, n_iter=4),
    "fab": functools.partial(fab.fab, n_restarts=2, n_iter=4),
    "fab_t": functools.partial(fab.fab, targeted=True, n_target_classes=2, n_iter=4),
    "square": functools.partial(square.square, n_queries=60),
    "autoattack_standard": functools.partial(
        versions.autoattack, version="standard", n_iter=4, fab_iter=4, n_queries=20,
        n_target_classes=2),
    "autoattack_rand": functools.partial(versions.autoattack, version="rand", n_iter=3,
                                         eot_iter=2, stochastic=True),
}
STOCHASTIC = ("apgd_eot", "autoattack_rand")  # these attack the randomised model


def _cheapest_compile():
  """No backend optimisation and the classic fusion emitters: compiles several times faster on a
  CPU; None where this XLA does not know the options."""
  options = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
  try:
    jax.jit(lambda a: a + 1, compiler_options=options).lower(1.0).compile()
    return options
  except Exception:  # pylint: disable=broad-except
    return None


CHEAPEST_COMPILE = _cheapest_compile()


@functools.lru_cache(maxsize=None)
def _compiled(name, norm):
  attack, apply_fn = ATTACKS[name], noisy_apply if name in STOCHASTIC else linear_apply
  return jax.jit(lambda v, x, y, k, e: attack(apply_fn, v, x, y, k, epsilon=e, norm=norm),
                 compiler_options=CHEAPEST_COMPILE)


def _problem(shape, seed):
  rng = np.random.default_rng(seed)
  d = int(np.prod(shape[1:]))
  variables = {"w": jnp.asarray(rng.normal(size=(d, NUM_CLASSES)), jnp.float32),
               "b": jnp.asarray(rng.normal(size=NUM_CLASSES), jnp.float32)}
  # Pixels on the box's faces as well as inside it.
  x = np.clip(rng.normal(0.5, 0.6, size=shape), 0.0, 1.0).astype(np.float32)
  y = rng.integers(0, NUM_CLASSES, size=shape[0]).astype(np.int32)
  return variables, jnp.asarray(x), jnp.asarray(y)


def _check_ball_and_box(x_adv, x, epsilon, norm):
  x_adv, x = np.asarray(x_adv, np.float64), np.asarray(x, np.float64)
  assert x_adv.shape == x.shape
  assert np.all(np.isfinite(x_adv))
  assert np.all(x_adv >= 0.0) and np.all(x_adv <= 1.0)
  delta = (x_adv - x).reshape(x.shape[0], -1)
  size = np.abs(delta).max(-1) if norm == "linf" else np.linalg.norm(delta, axis=-1)
  assert np.all(size <= epsilon * (1 + 1e-5) + 1e-6), (size, epsilon)


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("name", sorted(ATTACKS))
@settings(max_examples=3, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16),
       epsilons=st.lists(st.floats(1e-4, 2.0), min_size=3, max_size=3))
def test_adversarial_points_lie_in_the_ball_and_the_box(name, norm, seed, epsilons):
  """Every attack and norm, on one of the shapes (they alternate), at epsilon 0 and at epsilons
  hypothesis draws: each attack, norm and shape is compiled once, as compiling is what costs."""
  shape = SHAPES[(sorted(ATTACKS).index(name) + (norm == "l2")) % len(SHAPES)]
  variables, x, y = _problem(shape, seed)
  keys = jax.random.split(jax.random.key(seed), shape[0])
  for epsilon in [0.0] + epsilons:
    x_adv = _compiled(name, norm)(variables, x, y, keys, jnp.float32(epsilon))
    _check_ball_and_box(x_adv, x, epsilon, norm)


@settings(max_examples=8, deadline=None, derandomize=True)
@given(norm=st.sampled_from(("linf", "l2")), shape=st.sampled_from(SHAPES),
       seed=st.integers(0, 2**16), epsilon=st.floats(1e-3, 2.0))
def test_fab_projection_lands_on_the_hyperplane_inside_the_box(norm, shape, seed, epsilon):
  """The FAB projection, for any point (also on the box's faces) and hyperplane: inside the box,
  and on the hyperplane whenever the box reaches it."""
  del epsilon
  rng = np.random.default_rng(seed)
  n, d = shape[0], int(np.prod(shape[1:]))
  p = np.clip(rng.normal(0.5, 0.6, size=(n, d)), 0.0, 1.0).astype(np.float32)
  w = (rng.normal(size=(n, d)) * (rng.random((n, d)) > 0.2)).astype(np.float32)
  b = (np.sum(w * p, -1) + rng.normal(0, 2, size=n)).astype(np.float32)
  d_proj = np.asarray(_projection(norm)(p, w, b), np.float64)
  z = p + d_proj
  assert np.all(z >= -1e-6) and np.all(z <= 1 + 1e-6)
  reach_low = np.sum(np.minimum(w * 0.0, w * 1.0), -1)
  reach_high = np.sum(np.maximum(w * 0.0, w * 1.0), -1)
  reachable = (b > reach_low + 1e-3) & (b < reach_high - 1e-3)
  gap = np.abs(np.sum(w * z, -1) - b)
  assert np.all(gap[reachable] <= 1e-3 * (1 + np.abs(b[reachable]))), gap[reachable]


@functools.lru_cache(maxsize=None)
def _projection(norm):
  return jax.jit(functools.partial(fab.project_onto_hyperplane_in_box, norm=norm))
