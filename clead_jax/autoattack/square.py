"""Square attack (Andriushchenko et al. 2020, arXiv:1912.00049): a score-based black-box attack.
Each query changes the perturbation on one random square window and keeps the change if the
margin z_y - max_{j != y} z_j went down; the window shrinks on a fixed schedule of queries.

Defaults follow fra31/auto-attack (autoattack/square.py, SquareAttack, as AutoAttack builds it):
5,000 queries after the initial one, p_init 0.8, the margin loss, the unscaled schedule of p
(resc_schedule=False): p_init halves after queries 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000;
the square's side is round(sqrt(p h w)) (L2: at least 3 and odd).
Images are NHWC (other inputs are viewed as images). Unlike the reference, which draws one window and one sign per query for the
whole batch, every example draws its own (from its own key), so an example's result does not
depend on its batch; windows may also touch the last row and column.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from clead_jax import losses
from clead_jax import perturbation
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


def _as_images(x):
  """NHWC images as they are; other inputs viewed as images: (B, H, W) with one channel, and
  anything else flattened to one row of pixels, (B, 1, D, 1)."""
  if x.ndim == 4:
    return x
  if x.ndim == 3:
    return x[..., None]
  return x.reshape(x.shape[0], 1, -1, 1)


def _signs(keys, shape):
  """Per-example random signs of `shape`."""
  return jnp.where(common.uniform(keys, shape) < 0.5, 1.0, -1.0)


def _window(u_top, u_left, side, height, width):
  """A side x side window at a uniform random corner (u_* uniform in [0, 1)); side may be
  traced. Returns the (H, W, 1) mask and the corner."""
  top = jnp.minimum(jnp.floor(u_top * (height - side + 1)).astype(jnp.int32), height - side)
  left = jnp.minimum(jnp.floor(u_left * (width - side + 1)).astype(jnp.int32), width - side)
  rows = (jnp.arange(height) >= top) & (jnp.arange(height) < top + side)
  cols = (jnp.arange(width) >= left) & (jnp.arange(width) < left + side)
  return (rows[:, None] & cols[None, :])[..., None], top, left


def _linf_proposal(x, x_best, u, side, epsilon):
  """One example: the window becomes x +- epsilon, one random sign per channel."""
  height, width, channels = x.shape
  mask, _, _ = _window(u[0], u[1], side, height, width)
  signs = jnp.where(u[2:2 + channels] < 0.5, 1.0, -1.0)
  x_new = jnp.where(mask, x_best + 2.0 * epsilon * signs, x_best)
  return jnp.clip(jnp.clip(x_new, x - epsilon, x + epsilon), 0.0, 1.0)


def _l2_proposal(x, x_best, u, side, eta, epsilon):
  """One example: a new pattern on window 1 (plus its old direction), window 2 cleared, the
  budget the two windows held (plus what was unused) spent on window 1, and the whole
  perturbation rescaled to norm epsilon. `eta` is the side x side pattern, zero-padded."""
  height, width, channels = x.shape
  mask1, top, left = _window(u[0], u[1], side, height, width)
  mask2, _, _ = _window(u[2], u[3], side, height, width)
  signs = jnp.where(u[4:4 + channels] < 0.5, 1.0, -1.0)
  eta = jnp.where(u[4 + channels] < 0.5, eta, eta.T)
  rows = jnp.clip(jnp.arange(height) - top, 0, eta.shape[0] - 1)
  cols = jnp.clip(jnp.arange(width) - left, 0, eta.shape[1] - 1)
  pattern = eta[rows][:, cols][..., None] * signs  # eta placed on window 1
  delta = x_best - x
  window = jnp.where(mask1, delta, 0.0)
  window_norms = jnp.sqrt(jnp.sum(jnp.square(window), axis=(0, 1)))
  image_norm = jnp.sqrt(jnp.sum(jnp.square(delta)))
  # Per channel, as the reference's norms_windows (sum over the two spatial axes only).
  windows_norm = jnp.sqrt(jnp.sum(jnp.square(jnp.where(mask1 | mask2, delta, 0.0)), axis=(0, 1)))
  new = jnp.where(mask1, pattern + window / (1e-12 + window_norms), 0.0)
  budget = jnp.sqrt(jnp.maximum(epsilon ** 2 - image_norm ** 2, 0.0) / channels
                    + windows_norm ** 2)
  new = new / (1e-12 + jnp.sqrt(jnp.sum(jnp.square(new), axis=(0, 1)))) * budget
  delta = jnp.where(mask1, new, jnp.where(mask2, 0.0, delta))
  return jnp.clip(x + epsilon * _normalized(delta), 0.0, 1.0)


def _normalized(delta):
  return delta / jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(delta))), 1e-12)


def square_run(apply_fn, variables, x, y, key, *, epsilon, norm, n_queries=N_QUERIES,
               p_init=P_INIT):
  """One run of the Square attack; stops early once every example is fooled.

  One loop for all window sizes (the side is looked up per iteration, windows are masks), and
  one uniform draw per example and query: few random-number sites keep compilation short.
  """
  perturbation.check_norm(norm)
  shape = x.shape
  x = _as_images(x)
  batch, height, width, channels = x.shape
  init_keys, step_keys = perturbation.split_keys(perturbation.per_example_keys(key, batch), 2)

  def margin(x_in):
    logits, _ = apply_fn(variables, x_in.reshape(shape))
    return -losses.margin(logits, y)  # z_y - max_{j != y} z_j; <= 0: fooled

  if norm == "linf":
    # Vertical stripes: one random sign per column and channel.
    x_best = jnp.clip(x + epsilon * _signs(init_keys, (1, width, channels)), 0.0, 1.0)
  else:
    # Tiles of the pattern eta, each with a random orientation and a random sign per channel.
    tile, value, value_t, num_tiles = _l2_init_tiles(height, width)
    draws = common.uniform(init_keys, (num_tiles + 1, channels + 1))[:, tile]  # (B, H, W, C+1)
    delta = jnp.where(draws[..., -1:] < 0.5, value_t[..., None], value[..., None])
    delta = delta * jnp.where(draws[..., :-1] < 0.5, 1.0, -1.0)
    delta = jnp.where((tile >= 0)[..., None], delta, 0.0)  # tile -1: no tile there
    x_best = jnp.clip(x + epsilon * jax.vmap(_normalized)(delta), 0.0, 1.0)

  phases = square_sizes(n_queries, p_init, height, width, norm)
  phase_ends = jnp.asarray([end for _, end, _ in phases])
  sides = jnp.asarray([side for _, _, side in phases])
  max_side = max(side for _, _, side in phases)
  etas = jnp.asarray(np.stack([np.pad(eta_pattern(side), ((0, max_side - side),) * 2)
                               for _, _, side in phases]))

  def cond(carry):
    i, _, margin_min = carry
    return (i < n_queries) & jnp.any(margin_min > 0)

  def body(carry):
    i, x_best, margin_min = carry
    phase = jnp.searchsorted(phase_ends, i, side="right")
    side = sides[phase]
    u = jax.vmap(lambda k: jax.random.uniform(k, (5 + channels,)))(perturbation.fold_in(step_keys, i))
    if norm == "linf":
      x_new = jax.vmap(lambda xi, bi, ui: _linf_proposal(xi, bi, ui, side, epsilon))(
          x, x_best, u)
    else:
      x_new = jax.vmap(lambda xi, bi, ui: _l2_proposal(xi, bi, ui, side, etas[phase], epsilon))(
          x, x_best, u)
    margin_new = margin(x_new)
    improved = (margin_min > 0) & (margin_new < margin_min)
    x_best = jnp.where(perturbation.expand(improved, x), x_new, x_best)
    return i + 1, x_best, jnp.where(improved, margin_new, margin_min)

  _, x_best, _ = jax.lax.while_loop(cond, body, (jnp.int32(0), x_best, margin(x_best)))
  return perturbation.finish(x_best, x, epsilon, norm).reshape(shape)


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
