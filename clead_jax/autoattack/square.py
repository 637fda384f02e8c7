"""Square attack (Andriushchenko et al. 2020, arXiv:1912.00049): a score-based black-box attack.
Each query changes the perturbation on one random square window and keeps the change if the
margin z_y - max_{j != y} z_j went down; the window shrinks on a fixed schedule of queries.

Defaults follow fra31/auto-attack (autoattack/square.py, SquareAttack, as AutoAttack builds it):
5,000 queries after the initial one, p_init 0.8, the margin loss, the unscaled schedule of p
(resc_schedule=False): p_init halves after queries 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000;
the square's side is round(sqrt(p h w)) (L2: at least 3 and odd).
Images are NHWC. Unlike the reference, which draws one window and one sign per query for the
whole batch, every example draws its own (from its own key), so an example's result does not
depend on its batch; windows may also touch the last row and column.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from clead_jax import losses
from clead_jax.autoattack import common

N_QUERIES = 5000  # autoattack.py: square.n_queries = 5000
P_INIT = 0.8  # autoattack.py: SquareAttack(p_init=.8)
# square.py p_selection: p = p_init / divisor for iterations in (previous bound, bound].
_P_SCHEDULE = ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64),
               (6000, 128), (8000, 256), (math.inf, 512))


def square_sizes(n_queries, p_init, height, width, norm):
  """[(first iteration, end iteration, side of the square)] with equal sides merged."""
  phases, start = [], 0
  for bound, divisor in _P_SCHEDULE:
    end = min(bound + 1, n_queries)
    if end <= start:
      continue
    p = p_init / divisor
    side = max(int(round(math.sqrt(p * height * width))), 1)
    if norm == "l2":
      side = max(side, 3)
      side += 1 - side % 2
    side = min(side, height, width)
    if phases and phases[-1][2] == side:
      phases[-1] = (phases[-1][0], end, side)
    else:
      phases.append((start, end, side))
    start = end
    if end == n_queries:
      break
  return phases


def _rectangle_pattern(rows, cols):
  """Nested rectangles around the centre, weights 1/(ring+1)^2 summed outwards, unit L2 norm."""
  if rows == 0:
    return np.zeros((0, cols), np.float32)
  ring = np.maximum(np.abs(np.arange(rows)[:, None] - rows // 2),
                    np.abs(np.arange(cols)[None, :] - cols // 2))
  num_rings = max(rows // 2 + 1, cols // 2 + 1)
  weights = np.cumsum((1.0 / np.arange(1, num_rings + 1) ** 2)[::-1])[::-1]  # sum over k >= ring
  pattern = weights[ring]
  return pattern / np.sqrt(np.sum(pattern ** 2))


def eta_pattern(side):
  """The L2 square's pattern: +rectangles on the top half, -rectangles on the bottom half."""
  half = side // 2
  pattern = np.concatenate([_rectangle_pattern(half, side),
                            -_rectangle_pattern(side - half, side)])
  return (pattern / np.sqrt(np.sum(pattern ** 2))).astype(np.float32)


def _l2_init_tiles(height, width):
  """For the L2 start: each pixel's tile (-1: none) and its value in eta and in eta^T."""
  side = max(height // 5, 1)
  offset = max((height - 5 * side) // 2, 0)
  eta = eta_pattern(side)
  tile = -np.ones((height, width), np.int32)
  value, value_t = np.zeros((height, width), np.float32), np.zeros((height, width), np.float32)
  tiles_per_row = width // side
  for i in range(height // side):
    for j in range(tiles_per_row):
      top, left = offset + i * side, offset + j * side
      for r in range(top, min(top + side, height)):
        for c in range(left, min(left + side, width)):
          tile[r, c] = i * tiles_per_row + j
          value[r, c], value_t[r, c] = eta[r - top, c - left], eta[c - left, r - top]
  return tile, value, value_t, (height // side) * tiles_per_row


def _signs(key, shape):
  return jnp.where(jax.random.bernoulli(key, 0.5, shape), 1.0, -1.0)


def _window_mask(top, left, side, height, width):
  rows = (jnp.arange(height) >= top) & (jnp.arange(height) < top + side)
  cols = (jnp.arange(width) >= left) & (jnp.arange(width) < left + side)
  return (rows[:, None] & cols[None, :])[..., None]


def _corner(key, side, height, width):
  k_top, k_left = jax.random.split(key)
  return (jax.random.randint(k_top, (), 0, height - side + 1),
          jax.random.randint(k_left, (), 0, width - side + 1))


def _normalized(delta):
  return delta / jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(delta))), 1e-12)


def _linf_proposal(x, x_best, key, side, epsilon):
  """One example: the window becomes x +- epsilon, one random sign per channel."""
  height, width, channels = x.shape
  k_corner, k_sign = jax.random.split(key)
  top, left = _corner(k_corner, side, height, width)
  mask = _window_mask(top, left, side, height, width)
  x_new = jnp.where(mask, x_best + 2.0 * epsilon * _signs(k_sign, (channels,)), x_best)
  return jnp.clip(jnp.clip(x_new, x - epsilon, x + epsilon), 0.0, 1.0)


def _l2_proposal(x, x_best, key, side, epsilon, eta):
  """One example: a new pattern on window 1 (keeping its old direction's mass), window 2
  cleared, the budget the two windows held (plus what was unused) spent on window 1, and the
  whole perturbation rescaled to norm epsilon."""
  height, width, channels = x.shape
  k1, k2, k_sign, k_flip = jax.random.split(key, 4)
  top, left = _corner(k1, side, height, width)
  top2, left2 = _corner(k2, side, height, width)
  delta = x_best - x
  window = jax.lax.dynamic_slice(delta, (top, left, 0), (side, side, channels))
  window_norms = jnp.sqrt(jnp.sum(jnp.square(window), axis=(0, 1)))
  mask1 = _window_mask(top, left, side, height, width)
  mask2 = _window_mask(top2, left2, side, height, width)
  image_norm = jnp.sqrt(jnp.sum(jnp.square(delta)))
  windows_norm = jnp.sqrt(jnp.sum(jnp.square(delta * (mask1 | mask2))))
  pattern = jnp.where(jax.random.bernoulli(k_flip), eta.T, eta)
  new = pattern[..., None] * _signs(k_sign, (channels,)) + window / (1e-12 + window_norms)
  budget = jnp.sqrt(jnp.maximum(epsilon ** 2 - image_norm ** 2, 0.0) / channels
                    + windows_norm ** 2)
  new = new / (1e-12 + jnp.sqrt(jnp.sum(jnp.square(new), axis=(0, 1)))) * budget
  delta = jax.lax.dynamic_update_slice(jnp.where(mask2, 0.0, delta), new, (top, left, 0))
  return jnp.clip(x + epsilon * _normalized(delta), 0.0, 1.0)


def square_run(apply_fn, variables, x, y, key, *, epsilon, norm, n_queries=N_QUERIES,
               p_init=P_INIT):
  """One run of the Square attack on NHWC images; stops early once every example is fooled."""
  common.check_norm(norm)
  if x.ndim != 4:
    raise ValueError(f"the Square attack needs NHWC images; got shape {x.shape}")
  batch, height, width, channels = x.shape
  init_keys, step_keys = common.split_keys(common.per_example_keys(key, batch), 2)

  def margin(x_in):
    logits, _ = apply_fn(variables, x_in)
    return -losses.margin(logits, y)  # z_y - max_{j != y} z_j; <= 0: fooled

  if norm == "linf":
    # Vertical stripes: one random sign per column and channel.
    stripes = jax.vmap(lambda k: _signs(k, (1, width, channels)))(init_keys)
    x_best = jnp.clip(x + epsilon * stripes, 0.0, 1.0)
  else:
    tile, value, value_t, num_tiles = _l2_init_tiles(height, width)

    def init_delta(k):
      k_sign, k_flip = jax.random.split(k)
      signs = _signs(k_sign, (num_tiles + 1, channels))[tile]  # tile -1 is masked below
      flips = jax.random.bernoulli(k_flip, 0.5, (num_tiles + 1,))[tile]
      delta = jnp.where(flips, value_t, value)[..., None] * signs
      return _normalized(jnp.where((tile >= 0)[..., None], delta, 0.0))

    x_best = jnp.clip(x + epsilon * jax.vmap(init_delta)(init_keys), 0.0, 1.0)
  margin_min = margin(x_best)

  for start, end, side in square_sizes(n_queries, p_init, height, width, norm):
    if norm == "linf":
      propose = lambda xi, bi, ki, side=side: _linf_proposal(xi, bi, ki, side, epsilon)
    else:
      eta = jnp.asarray(eta_pattern(side))
      propose = lambda xi, bi, ki, side=side, eta=eta: _l2_proposal(xi, bi, ki, side, epsilon, eta)

    def cond(carry, end=end):
      i, _, margin_min = carry
      return (i < end) & jnp.any(margin_min > 0)

    def body(carry, propose=propose):
      i, x_best, margin_min = carry
      x_new = jax.vmap(propose)(x, x_best, common.fold_in(step_keys, i))
      margin_new = margin(x_new)
      improved = (margin_min > 0) & (margin_new < margin_min)
      x_best = jnp.where(common.expand(improved, x), x_new, x_best)
      return i + 1, x_best, jnp.where(improved, margin_new, margin_min)

    _, x_best, margin_min = jax.lax.while_loop(cond, body, (jnp.int32(start), x_best, margin_min))
  return common.finish(x_best, x, epsilon, norm)


def make_run(*, epsilon, norm, n_queries=N_QUERIES, p_init=P_INIT):
  """run(apply_fn, variables, x, y, keys, run_index) -> x_adv (AutoAttack uses one run)."""
  def run(apply_fn, variables, x, y, keys, run_index):
    del run_index
    return square_run(apply_fn, variables, x, y, keys, epsilon=epsilon, norm=norm,
                      n_queries=n_queries, p_init=p_init)
  return run


def square(apply_fn, variables, x, y, key, *, epsilon, norm="linf", n_queries=N_QUERIES,
           p_init=P_INIT):
  """The Square attack: one run of n_queries queries after the initial one."""
  return square_run(apply_fn, variables, x, y, key, epsilon=epsilon, norm=norm,
                    n_queries=n_queries, p_init=p_init)
