"""Pieces every attack shares, in [0, 1] pixel space: norms, projection onto the epsilon-ball and
the box, the steepest-ascent step, random starts, and per-example keys.

A leaf module: it imports nothing of clead_jax, and attacks.py, autoattack/ and evaluation/
build on it.

Per-example keys make an example's random draws a function of (seed, its index in the split), so
results do not depend on the batch it is evaluated in or on the number of devices.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

NORMS = ("linf", "l2")
INITS = ("none", "uniform", "normal")


def check_norm(norm):
  if norm not in NORMS:
    raise ValueError(f"norm={norm!r}; choose one of {NORMS}")


# --- per-example keys ----------------------------------------------------------------------------

def example_keys(seed, indices):
  """Example i's key: fold_in(key(seed), i), for the global indices of a batch."""
  base = jax.random.key(seed)
  return jax.vmap(lambda i: jax.random.fold_in(base, i))(indices)


def per_example_keys(key, batch_size):
  """One key per example: a single key is split, an array of keys is kept."""
  return jax.random.split(key, batch_size) if key.shape == () else key


def fold_in(keys, data):
  """fold_in on each example's key, with the same `data` (an int, possibly traced)."""
  return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, data)


def split_keys(keys, num):
  """`num` independent streams of per-example keys, shape (num, B)."""
  return jnp.swapaxes(jax.vmap(lambda k: jax.random.split(k, num))(keys), 0, 1)


# --- norms -----------------------------------------------------------------------------------------

def expand(v, like):
  """Per-example values (B,) reshaped to broadcast against a batch like `like`."""
  return v.reshape((-1,) + (1,) * (like.ndim - 1))


def flat_norm(v, norm="l2"):
  """Per-example L-inf or L2 norm over all but the first axis."""
  flat = v.reshape(v.shape[0], -1)
  if norm == "linf":
    return jnp.max(jnp.abs(flat), axis=-1)
  return jnp.sqrt(jnp.sum(jnp.square(flat), axis=-1))


def dual_norm(v, norm):
  """Per-example dual norm over all but the first axis: L1 for L-inf, L2 for L2."""
  return flat_norm(v, "l2") if norm == "l2" else jnp.sum(jnp.abs(v.reshape(v.shape[0], -1)), -1)


# --- projection and steps --------------------------------------------------------------------------

def project(x_adv, x, epsilon, norm):
  """Projects x_adv onto the epsilon-ball around x, then onto the box [0, 1]."""
  delta = x_adv - x
  if norm == "linf":
    delta = jnp.clip(delta, -epsilon, epsilon)
  else:
    scale = jnp.minimum(1.0, epsilon / jnp.maximum(flat_norm(delta), 1e-12))
    delta = delta * expand(scale, delta)
  return jnp.clip(x + delta, 0.0, 1.0)


def ascent_step(x_adv, grad, step_size, norm):
  """Steepest-ascent step for the norm: the sign for L-inf, the unit gradient for L2."""
  if norm == "linf":
    return x_adv + step_size * jnp.sign(grad)
  return x_adv + step_size * grad / expand(jnp.maximum(flat_norm(grad), 1e-12), grad)


def random_init(key, x, epsilon, norm, init="uniform"):
  """Starting point: x itself, uniform in the epsilon-ball, or x + 0.001 N(0, 1) (TRADES)."""
  if init not in INITS:
    raise ValueError(f"init={init!r}; choose one of {INITS}")
  if init == "none":
    return x
  keys = per_example_keys(key, x.shape[0])
  if init == "normal":
    noise = jax.vmap(lambda k: jax.random.normal(k, x.shape[1:], x.dtype))(keys)
    return jnp.clip(x + 0.001 * noise, 0.0, 1.0)
  if norm == "linf":
    delta = jax.vmap(lambda k: jax.random.uniform(k, x.shape[1:], x.dtype, -epsilon, epsilon))(keys)
  else:
    dims = x[0].size

    def one(k):
      k_dir, k_rad = jax.random.split(k)
      direction = jax.random.normal(k_dir, x.shape[1:], x.dtype)
      radius = epsilon * jax.random.uniform(k_rad, (), x.dtype) ** (1.0 / dims)
      return radius * direction / jnp.maximum(jnp.linalg.norm(direction), 1e-12)

    delta = jax.vmap(one)(keys)
  return jnp.clip(x + delta, 0.0, 1.0)


def finish(x_adv, x, epsilon, norm):
  """The last step of every attack: onto the epsilon-ball and the box, without gradient."""
  return jax.lax.stop_gradient(project(x_adv, x, epsilon, norm))


# --- what an attack's iterates did ---------------------------------------------------------------

class Trace(NamedTuple):
  """Per example, what an attack's iterates did: read by the indicators of attack failure
  (clead_jax/evaluation/indicators.py). Attacks return one only when asked (trace=True)."""
  losses: jax.Array  # (iterates, B): the objective the attack maximises, at each iterate
  misclassified: jax.Array  # (B,) bool: some iterate was misclassified
  start_gradient_zero: jax.Array  # (B,) bool: the input gradient at the start is all zero
  start_gradient_non_finite: jax.Array  # (B,) bool: ... or has a non-finite entry


def gradient_flags(grad):
  """(all zero, some entry not finite) per example."""
  flat = grad.reshape(grad.shape[0], -1)
  return jnp.all(flat == 0, -1), ~jnp.all(jnp.isfinite(flat), -1)
