"""FAB (Croce & Hein 2020, arXiv:1907.02044): the fast adaptive boundary attack. It linearises
the decision boundary at the current point, projects both the current point and the original
one onto that hyperplane (inside the box), moves to a convex combination biased towards the
original point, and steps back towards the original point whenever it is adversarial. It looks for
the smallest adversarial perturbation; the attack succeeds where that is within epsilon.

FAB-T (targeted) linearises only the boundary to one target class, the k-th largest clean logit,
so each iteration needs one gradient instead of the whole Jacobian.

Defaults follow fra31/auto-attack (autoattack/fab_base.py, FABAttack; autoattack.py): 100
iterations, alpha_max 0.1, eta 1.05 (overshoot), beta 0.9 (backward step), 9 target classes,
random restarts (all but the first) from a point at distance epsilon / 2.
"""

import jax
import jax.numpy as jnp
from clead_jax import perturbation

from clead_jax.autoattack import common

N_ITER = 100  # autoattack.py: FABAttack_PT(n_iter=100)
ALPHA_MAX = 0.1  # fab_base.py: alpha_max=0.1
ETA = 1.05  # fab_base.py: eta=1.05
BETA = 0.9  # fab_base.py: beta=0.9
N_TARGET_CLASSES = 9  # autoattack.py: fab.n_target_classes = 9
BISECTION_STEPS = 32  # the projection's bracket shrinks below float32 resolution


def project_onto_hyperplane_in_box(p, w, b, norm, bisection_steps=BISECTION_STEPS):
  """Smallest d (in the norm) with w . (p + d) = b and p + d in [0, 1]^n; rows are examples.

  With c = b - w . p > 0 (flip w otherwise), coordinate i moves only in the direction sign(w_i),
  by at most room_i (to the box). For L-inf, d_i = sign(w_i) min(s, room_i); for L2 (the KKT
  conditions), d_i = sign(w_i) min(s |w_i|, room_i). g(s) = w . d(s) is piecewise linear and
  increasing: bisection brackets the s with g(s) = c, then s is solved for in closed form on the
  bracket's linear piece. (Bisection instead of sorting the breakpoints, as the reference
  fab_projections.py does: XLA's sort is slow on CPU.) If the box cannot reach the hyperplane,
  every coordinate moves by its whole room, the closest the box gets.
  """
  c = b[:, None] - jnp.sum(w * p, axis=-1, keepdims=True)
  direction = jnp.where(c >= 0, 1.0, -1.0) * jnp.sign(w)  # the sign of each move
  c = jnp.abs(c)
  room = jnp.where(direction > 0, 1.0 - p, jnp.where(direction < 0, p, 0.0))
  abs_w = jnp.abs(w)
  scale, slope = (jnp.ones_like(w), abs_w) if norm == "linf" else (abs_w, jnp.square(w))
  moves = abs_w > 0
  # Coordinate i reaches the box at s = room_i / scale_i.
  saturates_at = jnp.where(moves, room / jnp.where(moves, scale, 1.0), 0.0)
  gain = lambda s: jnp.sum(abs_w * jnp.minimum(s * scale, room), axis=-1, keepdims=True)
  s_max = jnp.max(saturates_at, axis=-1, keepdims=True)
  feasible = gain(s_max) >= c

  def bisect(_, bracket):
    low, high = bracket
    mid = 0.5 * (low + high)
    below = gain(mid) < c
    return jnp.where(below, mid, low), jnp.where(below, high, mid)

  low, high = jax.lax.fori_loop(0, bisection_steps, bisect, (jnp.zeros_like(s_max), s_max))
  saturated = moves & (saturates_at <= low)
  free_slope = jnp.sum(jnp.where(moves & ~saturated, slope, 0.0), axis=-1, keepdims=True)
  saturated_gain = jnp.sum(jnp.where(saturated, abs_w * room, 0.0), axis=-1, keepdims=True)
  s = jnp.clip((c - saturated_gain) / jnp.maximum(free_slope, 1e-30), low, high)
  return direction * jnp.where(feasible, jnp.minimum(s * scale, room), room)


def _boundary(apply_fn, variables, x1, y, target, norm):
  """(f, grad f) of the boundary to linearise: f = z_j - z_y < 0 while x1 is classified y.

  Targeted: j is the target. Untargeted: the class whose linearised boundary is closest, which
  needs the gradient of every logit (a Jacobian, one backward pass per class).
  """
  if target is not None:
    def gap(x_in):
      logits, _ = apply_fn(variables, x_in)
      z_y = jnp.take_along_axis(logits, y[:, None], -1)[:, 0]
      z_t = jnp.take_along_axis(logits, target[:, None], -1)[:, 0]
      return jnp.sum(z_t - z_y), z_t - z_y

    grad, f = jax.grad(gap, has_aux=True)(x1)
    return f, grad
  logits, vjp = jax.vjp(lambda x_in: apply_fn(variables, x_in)[0], x1)
  num_classes = logits.shape[-1]
  # One backward pass per class, in sequence as in the reference: memory stays that of one pass.
  jacobian = jax.lax.map(
      lambda k: vjp(jnp.broadcast_to(jax.nn.one_hot(k, num_classes, dtype=logits.dtype),
                                     logits.shape))[0], jnp.arange(num_classes))
  jacobian = jnp.moveaxis(jacobian, 0, 1)  # (B, K, ...)
  one_hot = jax.nn.one_hot(y, num_classes, dtype=bool)
  f = logits - jnp.take_along_axis(logits, y[:, None], -1)
  g = jacobian - jnp.take_along_axis(jacobian, y.reshape((-1, 1) + (1,) * (x1.ndim - 1)), 1)
  g_flat = g.reshape(g.shape[:2] + (-1,))
  g_dual = (jnp.sum(jnp.abs(g_flat), -1) if norm == "linf"
            else jnp.sqrt(jnp.sum(jnp.square(g_flat), -1)))
  distance = jnp.where(one_hot, jnp.inf, jnp.abs(f) / (g_dual + 1e-12))
  closest = jnp.argmin(distance, -1)
  f_closest = jnp.take_along_axis(f, closest[:, None], -1)[:, 0]
  g_closest = jnp.take_along_axis(g, closest.reshape((-1, 1) + (1,) * (x1.ndim - 1)), 1)[:, 0]
  return f_closest, g_closest


def fab_run(apply_fn, variables, x, y, key, *, epsilon, norm, target=None, random_start=False,
            n_iter=N_ITER, alpha_max=ALPHA_MAX, eta=ETA, beta=BETA):
  """One run of FAB (FAB-T with a target per example); random_start may be traced.

  Returns the smallest adversarial point found where its distance is at most epsilon, else x.
  """
  perturbation.check_norm(norm)
  batch = x.shape[0]
  expand = lambda v: perturbation.expand(v, x)
  keys = perturbation.per_example_keys(key, batch)
  x_flat = x.reshape(batch, -1)
  x_start = x
  if random_start is not False:  # a traced flag, or True
    x_random = jnp.clip(
        x + 0.5 * epsilon * common.unit_direction(keys, x.shape[1:], norm, x.dtype), 0.0, 1.0)
    x_start = jnp.where(random_start, x_random, x)
  predict = common.predictor(apply_fn, variables)

  def body(_, carry):
    x1, x_best, best_distance = carry
    f, grad = _boundary(apply_fn, variables, x1, y, target, norm)
    w = grad.reshape(batch, -1)
    b = jnp.sum(w * x1.reshape(batch, -1), -1) - f  # the hyperplane f + w . (z - x1) = 0
    both = project_onto_hyperplane_in_box(jnp.concatenate([x1.reshape(batch, -1), x_flat]),
                                          jnp.concatenate([w, w]), jnp.concatenate([b, b]), norm)
    d1, d0 = both[:batch].reshape(x.shape), both[batch:].reshape(x.shape)
    a1 = jnp.maximum(perturbation.flat_norm(d1, norm), 1e-8)
    a0 = jnp.maximum(perturbation.flat_norm(d0, norm), 1e-8)
    alpha = expand(jnp.clip(a1 / (a1 + a0), 0.0, alpha_max))
    x1 = jnp.clip((x1 + eta * d1) * (1 - alpha) + (x + eta * d0) * alpha, 0.0, 1.0)
    adversarial = predict(x1) != y
    distance = perturbation.flat_norm(x1 - x, norm)
    better = adversarial & (distance < best_distance)
    x_best = jnp.where(expand(better), x1, x_best)
    best_distance = jnp.where(better, distance, best_distance)
    x1 = jnp.where(expand(adversarial), x + beta * (x1 - x), x1)
    return x1, x_best, best_distance

  _, x_best, best_distance = jax.lax.fori_loop(
      0, n_iter, body, (x_start, x, jnp.full(batch, jnp.inf, x.dtype)))
  x_adv = jnp.where(expand(best_distance <= epsilon), x_best, x)
  return perturbation.finish(x_adv, x, epsilon, norm)


def num_runs(num_classes, *, targeted, n_restarts=1, n_target_classes=N_TARGET_CLASSES):
  return n_restarts * (min(n_target_classes, num_classes - 1) if targeted else 1)


def make_run(*, epsilon, norm, targeted=False, n_restarts=1, n_iter=N_ITER, alpha_max=ALPHA_MAX,
             eta=ETA, beta=BETA):
  """run(apply_fn, variables, x, y, keys, run_index) -> x_adv: restart run_index % n_restarts
  (random start unless it is the first), and for FAB-T the target of rank
  2 + run_index // n_restarts in the clean logits (as FABAttack.perturb)."""

  def run(apply_fn, variables, x, y, keys, run_index):
    logits, _ = apply_fn(variables, x)
    target = common.target_classes(logits, 2 + run_index // n_restarts) if targeted else None
    x_adv = fab_run(apply_fn, variables, x, y, keys, epsilon=epsilon, norm=norm, target=target,
                    random_start=n_restarts > 1 and run_index % n_restarts > 0, n_iter=n_iter,
                    alpha_max=alpha_max, eta=eta, beta=beta)
    # FAB only attacks points it classifies correctly (fab_base.attack_single_run).
    return jnp.where(perturbation.expand(jnp.argmax(logits, -1) == y, x), x_adv, x)

  return run


def fab(apply_fn, variables, x, y, key, *, epsilon, norm="linf", targeted=False, n_restarts=1,
        n_target_classes=N_TARGET_CLASSES, n_iter=N_ITER, alpha_max=ALPHA_MAX, eta=ETA, beta=BETA):
  """FAB (targeted: FAB-T); an example keeps the first run (restart, target) that fools it."""
  perturbation.check_norm(norm)
  num_classes = common.num_classes_of(apply_fn, variables, x)
  run = make_run(epsilon=epsilon, norm=norm, targeted=targeted, n_restarts=n_restarts,
                 n_iter=n_iter, alpha_max=alpha_max, eta=eta, beta=beta)
  x_adv, _ = common.over_runs(
      lambda x_in, y_in, run_keys, r: run(apply_fn, variables, x_in, y_in, run_keys, r),
      num_runs(num_classes, targeted=targeted, n_restarts=n_restarts,
               n_target_classes=n_target_classes),
      common.predictor(apply_fn, variables), x, y, perturbation.per_example_keys(key, x.shape[0]))
  return perturbation.finish(x_adv, x, epsilon, norm)
