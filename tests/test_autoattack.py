"""AutoAttack: the exact robust accuracy of a linear classifier, APGD against a step-by-step
reference, the FAB projection against convex optimisation, Square's schedule against the
reference's, the Runner against the jitted composition, the checks, and the evaluation command.

Compilation dominates these tests' time on a CPU, so the jitted functions are built once per
module and compiled with XLA's cheapest options (the answers do not depend on them).
"""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

from clead_jax import attacks
from clead_jax import parallel
from clead_jax import perturbation
from clead_jax import report as report_lib
from clead_jax.autoattack import apgd
from clead_jax.autoattack import common
from clead_jax.autoattack import fab
from clead_jax.autoattack import square
from clead_jax.autoattack import versions
from clead_jax.evaluation import autoattack_runner
from clead_jax.evaluation import checks
from clead_jax.evaluation import suite
from clead_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cheap_compile_options(options):
  """XLA options that compile several times faster on a CPU (the answers do not depend on them),
  or None where this XLA does not know them."""
  try:
    jax.jit(lambda a: a + 1, compiler_options=options).lower(1.0).compile()
    return options
  except Exception:  # pylint: disable=broad-except
    return None


# Lighter backend optimisation and the classic fusion emitters: about half the compile time of
# the defaults here, with run time close to theirs.
FAST_COMPILE = cheap_compile_options({"xla_backend_optimization_level": 1,
                                      "xla_cpu_use_fusion_emitters": False})
# No backend optimisation at all: for programs that run only a few iterations.
FASTEST_COMPILE = cheap_compile_options({"xla_backend_optimization_level": 0,
                                         "xla_cpu_use_fusion_emitters": False})
NUM_CLASSES = 10
IMAGE_SHAPE = (4, 4, 3)
SEED = 0
# Square is AutoAttack's last stage and cannot beat an exact white-box answer: fewer queries here.
AUTOATTACK_SETTINGS = dict(n_queries=500)
# The sharded Runner's test: fewer points and iterations (its answer is the jitted composition's).
SHARDED_EXAMPLES = 60
SHARDED_SETTINGS = dict(n_iter=20, fab_iter=20, n_queries=100)


# --- a linear classifier, whose robust accuracy is known exactly ---------------------------------

def linear_apply(variables, x):
  logits = x.reshape(x.shape[0], -1) @ variables["w"] + variables["b"]
  return logits, logits


def linear_problem(n=200, seed=SEED):
  """Random W, b; points with coordinates in [0.3, 0.7] (epsilon <= 0.2 never meets the box);
  labels the model's prediction, 10% of them changed (misclassified points)."""
  rng = np.random.default_rng(seed)
  d = int(np.prod(IMAGE_SHAPE))
  w = rng.normal(size=(d, NUM_CLASSES)).astype(np.float32)
  b = rng.normal(size=NUM_CLASSES).astype(np.float32)
  x = rng.uniform(0.3, 0.7, size=(n,) + IMAGE_SHAPE).astype(np.float32)
  y = np.argmax(x.reshape(n, -1) @ w + b, -1)
  y = np.where(rng.random(n) < 0.1, (y + 1) % NUM_CLASSES, y).astype(np.int32)
  return {"w": jnp.asarray(w), "b": jnp.asarray(b)}, x, y


def exact_robust(variables, x, y, epsilon, norm, margin=1e-3):
  """(robust, decided): x is robust iff for every j != y,
  (w_y - w_j) . x + b_y - b_j > epsilon ||w_y - w_j||_* (the dual norm: L1 for L-inf, L2 for L2),
  i.e. its distance to the decision boundary exceeds epsilon. `decided`: that distance is not
  within `margin` of epsilon."""
  w, b = np.asarray(variables["w"], np.float64), np.asarray(variables["b"], np.float64)
  logits = x.reshape(len(y), -1).astype(np.float64) @ w + b
  gaps = logits[np.arange(len(y)), y][:, None] - logits  # (n, K)
  dw = w.T[y][:, None, :] - w.T[None, :, :]  # (n, K, d)
  dual = np.abs(dw).sum(-1) if norm == "linf" else np.linalg.norm(dw, axis=-1)
  with np.errstate(divide="ignore", invalid="ignore"):
    distance = np.where(np.arange(NUM_CLASSES) == y[:, None], np.inf, gaps / dual).min(-1)
  return distance > epsilon, np.abs(distance - epsilon) > margin


def example_keys(n, seed=SEED):
  """The keys suite.Evaluator and autoattack_runner.Runner give examples 0..n-1."""
  return jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.arange(n))


@functools.lru_cache(maxsize=None)
def _autoattack(norm):
  """AutoAttack (standard), jitted: every stage runs on every point, so besides the composition's
  flags it gives APGD-T's and FAB-T's on their own (their reference settings: 9 targets, 100
  iterations, 1 restart)."""
  return jax.jit(functools.partial(versions.autoattack_flags, linear_apply, norm=norm,
                                   version="standard", **AUTOATTACK_SETTINGS),
                 compiler_options=FAST_COMPILE)


def _predict(variables, x_adv):
  return np.argmax(np.asarray(linear_apply(variables, jnp.asarray(x_adv))[0]), -1)


def _assert_in_ball_and_box(x_adv, x, epsilon, norm):
  delta = (np.asarray(x_adv, np.float64) - x).reshape(len(x), -1)
  size = np.abs(delta).max(-1) if norm == "linf" else np.linalg.norm(delta, axis=-1)
  assert np.all(size <= epsilon + 1e-5) and np.all((x_adv >= 0) & (x_adv <= 1))


@pytest.mark.parametrize("norm,epsilons", [("linf", (0.03, 0.05, 0.07)),
                                           ("l2", (0.1, 0.15, 0.2))])
def test_exact_robust_accuracy_of_a_linear_classifier(norm, epsilons):
  """APGD-T, FAB-T and AutoAttack (standard) each find an adversarial point for exactly the
  points that have one, on 200 random points, three epsilons, both norms."""
  variables, x, y = linear_problem()
  keys = example_keys(len(y))
  for epsilon in epsilons:
    robust, decided = exact_robust(variables, x, y, epsilon, norm)
    assert 0.1 < robust.mean() < 0.95 and decided.mean() > 0.95  # the test can fail
    flags = _autoattack(norm)(variables, x, y, keys, epsilon=epsilon)
    x_adv = np.asarray(flags.x_adv)
    _assert_in_ball_and_box(x_adv, x, epsilon, norm)
    survived = _predict(variables, x_adv) == y
    robust_after, robust_alone = np.asarray(flags.robust_after), np.asarray(flags.robust_alone)
    np.testing.assert_array_equal(robust_after[-1], survived)
    assert np.all(robust_after[1:] <= robust_after[:-1])  # stages only remove points
    for name, found in [("APGD-T", robust_alone[1]), ("FAB-T", robust_alone[2]),
                        ("AutoAttack", survived)]:
      wrong = np.flatnonzero((found != robust) & decided)
      assert not len(wrong), (f"{name} at {norm} epsilon {epsilon}: examples {wrong} "
                              f"{'survive' if found[wrong[0]] else 'fall'}; robust accuracy "
                              f"{found[decided].mean():.4f}, exact {robust[decided].mean():.4f}")


_RUNNER_SCRIPT = """
import sys
import numpy as np
import jax
from clead_jax import parallel
from clead_jax import report as report_lib
from clead_jax.evaluation import autoattack_runner
from tests import test_autoattack as t
assert jax.device_count() == 4, jax.devices()
variables, x, y = t.linear_problem(n=t.SHARDED_EXAMPLES)
runner = autoattack_runner.Runner(t.linear_apply, parallel.make_mesh(), "linf", batch_size=16,
                           seed=t.SEED, compiler_options=t.FASTEST_COMPILE, **t.SHARDED_SETTINGS)
result = runner.run(variables, x, y, float(sys.argv[2]))
assert result.stage_names == ["apgd_ce", "apgd_t", "fab_t", "square"], result.stage_names
np.save(sys.argv[1], result.robust_after)
print(result.robust_after.mean(-1))
"""


def test_runner_on_four_devices_matches_the_jitted_composition(tmp_path):
  """The Runner (stage by stage, only the points still robust, batches of 16 sharded over four
  devices) and the jitted composition (every stage on the whole batch, one device) give the same
  flags after every stage: results depend neither on the batch nor on the devices."""
  norm, epsilon = "linf", 0.05
  path = str(tmp_path / "robust_after.npy")
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
             XLA_FLAGS="--xla_force_host_platform_device_count=4")
  process = subprocess.run([sys.executable, "-c", _RUNNER_SCRIPT, path, str(epsilon)], cwd=REPO,
                           env=env, capture_output=True, text=True, timeout=600)
  assert process.returncode == 0, process.stderr[-3000:]
  variables, x, y = linear_problem(n=SHARDED_EXAMPLES)
  composition = jax.jit(functools.partial(
      versions.autoattack_flags, linear_apply, version="standard", norm=norm,
      **SHARDED_SETTINGS), compiler_options=FASTEST_COMPILE)
  robust_after = np.asarray(composition(variables, x, y, example_keys(len(y)),
                                        epsilon=epsilon).robust_after)
  np.testing.assert_array_equal(np.load(path), robust_after)
  assert robust_after[0].sum() > robust_after[-1].sum()  # a later stage did some work


# --- APGD against a step-by-step reference --------------------------------------------------------

def _reference_loss_grad(x_flat, w, b, y, target, loss):
  """Loss and input gradient of a linear model, in closed form."""
  z = x_flat @ w + b
  if loss == "ce":
    p = np.exp(z - z.max())
    p /= p.sum()
    return -np.log(p[y]), w @ (p - np.eye(len(z))[y]), z
  order = np.argsort(z)
  top, third, fourth = order[-1], order[-3], order[-4]
  numerator, denominator = z[y] - z[target], z[top] - 0.5 * (z[third] + z[fourth]) + 1e-12
  d_numerator = w[:, y] - w[:, target]
  d_denominator = w[:, top] - 0.5 * (w[:, third] + w[:, fourth])
  grad = -(d_numerator * denominator - numerator * d_denominator) / denominator ** 2
  return -numerator / denominator, grad, z


def reference_apgd(x, y, target, x_start, w, b, epsilon, norm, loss, n_iter):
  """APGD on one example, one step at a time (Croce & Hein 2020, Algorithm 1, with the
  checkpoints of autopgd_base.py). Returns (x_adv, fooled, iterations where the step halved)."""
  x, x_adv = x.ravel(), x_start.ravel()

  def project(v):
    delta = v - x
    if norm == "linf":
      delta = np.clip(delta, -epsilon, epsilon)
    else:
      delta = delta * min(1.0, epsilon / max(np.linalg.norm(delta), 1e-12))
    return np.clip(x + delta, 0.0, 1.0)

  def direction(g):
    return np.sign(g) if norm == "linf" else g / max(np.linalg.norm(g), 1e-12)

  value, grad, z = _reference_loss_grad(x_adv, w, b, y, target, loss)
  step, x_prev = 2.0 * epsilon, x_adv
  x_max, value_max, grad_max = x_adv, value, grad
  fooled, x_fool = bool(np.argmax(z) != y), x_adv
  value_prev, increases, value_max_at_check, reduced_at_check = value, 0, value, True
  interval, since_check = max(int(0.22 * n_iter), 1), 0
  halved = []
  for i in range(n_iter):
    a = 0.75 if i > 0 else 1.0
    z_step = project(x_adv + step * direction(grad))
    x_prev, x_adv = x_adv, project(x_adv + a * (z_step - x_adv) + (1 - a) * (x_adv - x_prev))
    value, grad, z = _reference_loss_grad(x_adv, w, b, y, target, loss)
    if np.argmax(z) != y:
      fooled, x_fool = True, x_adv
    if value > value_max:
      x_max, value_max, grad_max = x_adv, value, grad
    increases += value > value_prev
    value_prev = value
    since_check += 1
    if since_check == interval:
      reduce = increases <= 0.75 * interval or (not reduced_at_check
                                                and value_max_at_check >= value_max)
      if reduce:
        step, x_adv, grad = step / 2, x_max, grad_max
        halved.append(i + 1)
      reduced_at_check, value_max_at_check, increases, since_check = reduce, value_max, 0, 0
      interval = max(interval - max(int(0.03 * n_iter), 1), max(int(0.06 * n_iter), 1))
  return (x_fool if fooled else x_max), fooled, halved


@pytest.mark.parametrize("norm,loss,epsilon", [("linf", "ce", 0.06), ("l2", "dlr", 0.3)])
def test_apgd_matches_a_step_by_step_reference(norm, loss, epsilon):
  """In float64, vectorised APGD (CE untargeted; targeted DLR) follows the reference loop
  exactly, halving its step at the reference's checkpoints."""
  n_iter = 100
  assert apgd.checkpoints(n_iter) == [22, 41, 57, 70, 80, 87, 93, 99]
  with jax.enable_x64(True):
    variables, x, y = linear_problem(n=12, seed=3)
    variables = jax.tree.map(lambda a: np.asarray(a, np.float64), variables)
    x = x.astype(np.float64)
    w, b = variables["w"], variables["b"]
    logits = x.reshape(len(y), -1) @ w + b
    target = np.argsort(logits, -1)[:, -2] if loss == "dlr" else None
    keys = example_keys(len(y))

    @jax.jit
    def run(x, y, keys, target):
      x_adv, fooled = apgd.apgd_run(linear_apply, variables, x, y, keys, epsilon=epsilon,
                                    norm=norm, loss=loss, target=target, n_iter=n_iter)
      start_keys, _ = perturbation.split_keys(keys, 2)
      x_start = jnp.clip(x + epsilon * common.unit_direction(start_keys, x.shape[1:], norm,
                                                              x.dtype), 0.0, 1.0)
      return x_adv, fooled, x_start

    x_adv, fooled, x_start = map(np.asarray, run(x, y, keys, None if target is None
                                                 else jnp.asarray(target)))
  all_halved = set()
  for i in range(len(y)):
    ref_x, ref_fooled, halved = reference_apgd(
        x[i], y[i], None if target is None else target[i], x_start[i], w, b, epsilon, norm,
        loss, n_iter)
    assert fooled[i] == ref_fooled
    np.testing.assert_allclose(x_adv[i].ravel(), ref_x, atol=1e-9)
    all_halved.update(halved)
  assert all_halved and all_halved <= set(apgd.checkpoints(n_iter))  # the step did halve
  assert 0 < fooled.sum() < len(y)


# --- FAB's projection against convex optimisation -------------------------------------------------

@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fab_projection_is_the_closest_point_of_the_hyperplane_in_the_box(norm):
  rng = np.random.default_rng(1)
  rows, n = 16, 6
  p = rng.uniform(0, 1, (rows, n))
  p[:, 0], p[:, 1] = 0.0, 1.0  # on the box's faces
  w = rng.normal(size=(rows, n))
  w[::4, 2] = 0.0
  c = rng.normal(0, 1.0, rows)
  c[-2:] = [50.0, -50.0]  # out of the box's reach
  b = np.sum(w * p, -1) + c
  with jax.enable_x64(True):
    d = np.asarray(jax.jit(functools.partial(fab.project_onto_hyperplane_in_box, norm=norm))(
        p, w, b))
  for i in range(rows):
    low, high = -p[i], 1.0 - p[i]  # the box, for d
    assert np.all(d[i] >= low - 1e-12) and np.all(d[i] <= high + 1e-12)
    reach = (np.sum(np.minimum(w[i] * low, w[i] * high)), np.sum(np.maximum(w[i] * low,
                                                                            w[i] * high)))
    if not reach[0] <= c[i] <= reach[1]:
      # Out of reach: the box's point closest to the hyperplane, which maximises w . d.
      np.testing.assert_allclose(w[i] @ d[i], reach[1] if c[i] > reach[1] else reach[0],
                                 atol=1e-9)
      continue
    np.testing.assert_allclose(w[i] @ d[i], c[i], atol=1e-9)
    bounds = list(zip(low, high))
    if norm == "linf":  # min t s.t. -t <= d_j <= t, w . d = c, the box
      eye = np.eye(n)
      result = optimize.linprog(
          np.r_[np.zeros(n), 1.0], A_ub=np.block([[eye, -np.ones((n, 1))],
                                                   [-eye, -np.ones((n, 1))]]),
          b_ub=np.zeros(2 * n), A_eq=np.r_[w[i], 0.0][None], b_eq=[c[i]],
          bounds=bounds + [(0, None)])
      np.testing.assert_allclose(np.abs(d[i]).max(), result.fun, atol=1e-7)
    else:
      result = optimize.minimize(
          lambda v: v @ v, np.clip(np.zeros(n), low, high), jac=lambda v: 2 * v,
          constraints={"type": "eq", "fun": lambda v, i=i: w[i] @ v - c[i],
                       "jac": lambda v, i=i: w[i]},
          bounds=bounds, method="SLSQP", options={"ftol": 1e-14, "maxiter": 500})
      np.testing.assert_allclose(d[i], result.x, atol=1e-5)


# --- Square's schedule ----------------------------------------------------------------------------

def _reference_p(iteration, p_init=0.8):
  """square.py p_selection with resc_schedule=False, transcribed."""
  for bound, divisor in ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32),
                         (4000, 64), (6000, 128), (8000, 256)):
    if iteration <= bound:
      return p_init / divisor
  return p_init / 512


@pytest.mark.parametrize("norm,height,width", [("linf", 32, 32), ("l2", 32, 32),
                                               ("linf", 8, 8), ("l2", 8, 8)])
def test_square_sizes_follow_the_reference_schedule(norm, height, width):
  expected = []
  for i in range(square.N_QUERIES):
    side = max(int(round(np.sqrt(_reference_p(i) * height * width))), 1)
    if norm == "l2":
      side = max(side, 3)
      side += 1 - side % 2
    expected.append(min(side, height, width))
  got = []
  for start, end, side in square.square_sizes(square.N_QUERIES, 0.8, height, width, norm):
    got += [side] * (end - start)
  assert got == expected
  if (norm, height) == ("linf", 32):
    assert sorted(set(got), reverse=True) == [29, 20, 14, 10, 7, 5, 4, 3]


def _reference_rectangles(rows, cols):
  """square.py eta_rectangles, transcribed: rings of weight 1/(k+1)^2 added around the centre."""
  delta = np.zeros((rows, cols))
  top, left = rows // 2, cols // 2
  for k in range(max(rows // 2 + 1, cols // 2 + 1)):
    delta[max(top - k, 0):min(top - k + 2 * k + 1, rows),
          max(left - k, 0):min(left - k + 2 * k + 1, cols)] += 1.0 / (k + 1) ** 2
  return delta / np.sqrt(np.sum(delta ** 2)) if rows else delta


@pytest.mark.parametrize("side", range(1, 12))
def test_square_l2_pattern_matches_the_reference_loops(side):
  expected = np.zeros((side, side))
  expected[:side // 2] = _reference_rectangles(side // 2, side)
  expected[side // 2:] = -_reference_rectangles(side - side // 2, side)
  expected /= np.sqrt(np.sum(expected ** 2))
  np.testing.assert_allclose(square.eta_pattern(side), expected, rtol=1e-6, atol=1e-7)


def _reference_l2_proposal(x, x_best, corners, side, eta, signs, epsilon):
  """square.py (L2) one proposal for one example, transcribed in CHW: window 1 gets eta times a
  sign per channel plus its old direction, rescaled per channel to the budget of the two windows
  (per channel) plus the unused part of epsilon; window 2 is cleared."""
  (vh, vw), (vh2, vw2) = corners
  channels = x.shape[0]
  delta = x_best - x
  mask_1, mask_2 = np.zeros_like(x), np.zeros_like(x)
  mask_1[:, vh:vh + side, vw:vw + side] = 1.0
  mask_2[:, vh2:vh2 + side, vw2:vw2 + side] = 1.0
  norms_window_1 = np.sqrt(np.sum(delta[:, vh:vh + side, vw:vw + side] ** 2, axis=(-2, -1),
                                  keepdims=True))
  norms_image = np.sqrt(np.sum(delta ** 2))
  norms_windows = np.sqrt(np.sum((delta * np.maximum(mask_1, mask_2)) ** 2, axis=(-2, -1),
                                 keepdims=True))
  new = np.ones((channels, side, side)) * eta[None] * signs[:, None, None]
  new = new + delta[:, vh:vh + side, vw:vw + side] / (1e-12 + norms_window_1)
  new = new / (1e-12 + np.sqrt(np.sum(new ** 2, axis=(-2, -1), keepdims=True))) * np.sqrt(
      np.maximum(epsilon ** 2 - norms_image ** 2, 0.0) / channels + norms_windows ** 2)
  delta[:, vh2:vh2 + side, vw2:vw2 + side] = 0.0
  delta[:, vh:vh + side, vw:vw + side] = new
  return np.clip(x + epsilon * delta / (1e-12 + np.sqrt(np.sum(delta ** 2))), 0.0, 1.0)


@pytest.mark.parametrize("corners", [((1, 2), (6, 5)), ((3, 3), (5, 4)), ((0, 0), (0, 0))])
@pytest.mark.parametrize("transpose", [False, True])
def test_square_l2_proposal_matches_the_reference(corners, transpose):
  """One L2 proposal of ours (HWC, per-example draws) against the transcription, on a 3-channel
  image whose channels hold perturbations of different sizes: the two windows' budget is per
  channel in the reference."""
  rng = np.random.default_rng(0)
  height = width = 12
  side, channels, epsilon = 5, 3, 1.0
  x = rng.uniform(0.2, 0.8, size=(height, width, channels)).astype(np.float32)
  delta = rng.normal(size=x.shape) * np.array([0.01, 0.03, 0.06])  # norm ~0.5 < epsilon
  x_best = (x + delta).astype(np.float32)
  signs = np.array([1.0, -1.0, 1.0])
  place = lambda corner: (corner + 0.5) / (height - side + 1)
  u = np.concatenate([[place(corners[0][0]), place(corners[0][1]), place(corners[1][0]),
                       place(corners[1][1])], np.where(signs > 0, 0.25, 0.75),
                      [0.75 if transpose else 0.25]]).astype(np.float32)
  eta = square.eta_pattern(side)
  ours = square._l2_proposal(jnp.asarray(x), jnp.asarray(x_best), jnp.asarray(u), side,  # pylint: disable=protected-access
                             jnp.asarray(eta), epsilon)
  expected = _reference_l2_proposal(x.transpose(2, 0, 1).astype(np.float64),
                                    x_best.transpose(2, 0, 1).astype(np.float64), corners, side,
                                    eta.T if transpose else eta, signs, epsilon)
  np.testing.assert_allclose(np.asarray(ours), expected.transpose(1, 2, 0), atol=2e-5)


def test_square_alone_fools_most_non_robust_points():
  """A black-box attack that works: on the linear model, Square (1,000 queries) fools at least
  90% of the points that can be fooled, and never one that cannot."""
  variables, x, y = linear_problem(n=100)
  epsilon = 0.05
  robust, decided = exact_robust(variables, x, y, epsilon, "linf")
  attack = jax.jit(lambda v, x, y, k: square.square(linear_apply, v, x, y, k, epsilon=epsilon,
                                                    norm="linf", n_queries=1000),
                   compiler_options=FAST_COMPILE)
  survived = _predict(variables, attack(variables, x, y, example_keys(len(y))))
  survived = survived == y
  assert np.all(survived[robust & decided])
  foolable = ~robust & decided & (_predict(variables, x) == y)
  assert np.mean(~survived[foolable]) >= 0.9


# --- the checks -----------------------------------------------------------------------------------

def _result(robust_after, clean):
  return autoattack_runner.Result("autoattack", ["apgd_ce", "apgd_t", "fab_t", "square"],
                           [False, False, False, True], np.asarray(clean, bool),
                           np.asarray(robust_after, bool), 0.0)


def test_black_box_success_is_flagged_with_its_count():
  clean = [1, 1, 1, 1, 0]
  white = [0, 1, 1, 1, 0]
  flagged = checks.black_box_warnings([_result([white, white, white, [0, 0, 1, 0, 0]], clean)])
  assert len(flagged) == 1 and "fooled 2 of 5 points" in flagged[0]
  assert "apgd_ce, apgd_t, fab_t" in flagged[0]
  assert not checks.black_box_warnings([_result([white, white, white, white], clean)])


def test_stronger_attacks_and_larger_epsilons_must_not_raise_accuracy():
  flagged = checks.monotonicity_warnings({"pgd20": 0.50, "pgd100": 0.505}, num_examples=200)
  assert len(flagged) == 1 and "pgd100" in flagged[0] and "(1 example)" in flagged[0]
  assert not checks.monotonicity_warnings({"pgd20": 0.50, "pgd100": 0.50})
  assert not checks.monotonicity_warnings({"fgsm": 0.50, "pgd20": 0.504})  # within sampling noise
  assert checks.monotonicity_warnings({"fgsm": 0.50, "pgd20": 0.51})
  assert checks.monotonicity_warnings({"pgd100": 0.40, "autoattack": 0.45})
  curve = {"attack": "pgd20", "epsilon": [0.0, 0.1, 0.2, 0.3], "accuracy": [0.9, 0.5, 0.55, 0.3]}
  flagged = checks.monotonicity_warnings({}, curve)
  assert len(flagged) == 1 and "1 of 3 steps" in flagged[0] and "0.2" in flagged[0]
  curve["accuracy"] = [0.9, 0.5, 0.5, 0.3]
  assert not checks.monotonicity_warnings({}, curve)


class _Linear:
  """A stand-in for models.Network: apply(variables, x, train) -> (logits, embedding)."""

  def apply(self, variables, x, train=False):
    del train
    return linear_apply(variables, x)


def test_zero_and_non_finite_input_gradients_are_counted():
  variables, x, y = linear_problem(n=40)
  evaluator = suite.Evaluator(_Linear(), parallel.make_mesh(), "linf", 16, SEED)
  zero, non_finite = evaluator.input_gradient_flags(variables, x, y)
  assert not zero.any() and not non_finite.any()
  # Logits scaled up until the softmax saturates: the CE gradient is exactly zero where the
  # model is right.
  saturated = {"w": variables["w"] * 1e4, "b": variables["b"] * 1e4}
  zero, _ = evaluator.input_gradient_flags(saturated, x, y)
  correct = _predict(saturated, x) == y
  assert zero.sum() >= 0.5 * correct.sum()
  flagged = checks.gradient_warnings(zero, np.zeros_like(zero))
  assert len(flagged) == 1 and f"zero at {zero.sum()} of 40" in flagged[0]
  broken = {"w": variables["w"].at[0, 0].set(jnp.nan), "b": variables["b"]}
  _, non_finite = evaluator.input_gradient_flags(broken, x, y)
  assert non_finite.all()
  assert "not finite at 40 of 40" in checks.gradient_warnings(zero & False, non_finite)[0]


def test_worst_case_counts_a_point_only_if_every_attack_failed_on_it():
  """report's worst_case_accuracy: the AND of the per-example flags of clean and of each attack,
  computed here from the attacks themselves; between the exact robust accuracy and the lowest
  single accuracy."""
  variables, x, y = linear_problem(n=200)
  epsilon, names = 0.06, ["fgsm", "pgd20", "cw"]
  evaluator = suite.Evaluator(_Linear(), parallel.make_mesh(), "linf", 200, SEED)
  result = suite.evaluate(evaluator, variables, x, y, epsilon=epsilon, attack_names=names)
  keys = example_keys(len(y))
  every = _predict(variables, x) == y
  for name in names:
    x_adv = attacks.EVAL_ATTACKS[name](linear_apply, variables, jnp.asarray(x), jnp.asarray(y),
                                       keys, epsilon=epsilon, norm="linf")
    fooled_here = _predict(variables, x_adv) != y
    assert np.isclose(result["robust_accuracy"][name], 1 - fooled_here.mean())
    every &= ~fooled_here
  assert result["worst_case_accuracy"] == every.mean()
  # Here CW and PGD-20 fool different points: the worst case is below the lowest accuracy.
  assert result["worst_case_accuracy"] < min(result["robust_accuracy"].values())
  assert result["worst_case_accuracy"] >= exact_robust(variables, x, y, epsilon, "linf")[0].mean()
  report = {"method": "pgd_at", "dataset": "digits", "model": "linear", "norm": "linf",
            "epsilon": epsilon, "steps": 0, "train_time_s": 0.0, **result}
  assert f"| worst case per example (fgsm, pgd20, cw) | {every.mean():.4f} |" in (
      report_lib.to_markdown(report))


def test_autoattack_is_a_registered_evaluation_attack():
  assert "autoattack" in suite.WHITE_BOX_ATTACKS  # so config.eval.curve_attack may name it too
  names = "fgsm,autoattack,autoattack_plus,autoattack_rand"
  assert suite.parse_attack_names(names) == names.split(",")
  assert set(versions.ATTACK_NAMES) == {"autoattack", "autoattack_plus", "autoattack_rand"}


# --- the evaluation command -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def untrained_workdir(tmp_path_factory):
  """A workdir as training leaves it (config.json and a checkpoint at step 5) for an untrained
  small CNN on digits: cheap to make, and most of its points fall to the first stage."""
  from tests.conftest import digits_config  # pylint: disable=g-import-not-at-top
  from tests.workdirs import random_weights_workdir  # pylint: disable=g-import-not-at-top
  config = digits_config(**{"model.width": 4, "eval.curve_points": 3, "eval.curve_attack": "fgsm",
                            "attack.epsilon": 0.5})
  return random_weights_workdir(str(tmp_path_factory.mktemp("evaluate")), config)


def test_evaluation_command_writes_the_report(untrained_workdir):
  from clead_jax.evaluation import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  report = workdir_lib.evaluate_workdir(untrained_workdir, attacks="fgsm,autoattack",
                                     num_examples=24, progress=False)
  with open(os.path.join(untrained_workdir, "report.json")) as f:
    written = json.load(f)
  assert written == json.loads(json.dumps(report))
  for key in ("method", "dataset", "model", "norm", "epsilon", "num_examples", "clean_accuracy",
              "robust_accuracy", "steps", "train_time_s", "eval_time_s", "warnings"):
    assert key in written, key
  assert written["steps"] == 5 and written["num_examples"] == 24
  stages = ["autoattack/apgd_ce", "autoattack/apgd_t", "autoattack/fab_t", "autoattack/square"]
  robust_accuracy = written["robust_accuracy"]
  assert list(robust_accuracy) == ["fgsm", "autoattack"] + stages
  ladder = [written["clean_accuracy"]] + [robust_accuracy[s] for s in stages]
  assert all(a >= b for a, b in zip(ladder, ladder[1:]))
  assert robust_accuracy["autoattack"] == robust_accuracy["autoattack/square"]
  assert len(written["robustness_curve"]["accuracy"]) == 3
  for name in ("report.md", "robustness_curve.png"):
    assert os.path.exists(os.path.join(untrained_workdir, name))
  with open(os.path.join(untrained_workdir, "report.md")) as f:
    assert "autoattack/apgd_t" in f.read()


def test_unknown_checkpoint_step_lists_the_available_ones(untrained_workdir):
  from clead_jax.evaluation import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  with pytest.raises(UserError, match=r"--checkpoint=7: .* available steps: \[5\]"):
    workdir_lib.evaluate_workdir(untrained_workdir, attacks="fgsm", checkpoint="7")
  with pytest.raises(UserError, match=r"unknown attack"):
    workdir_lib.evaluate_workdir(untrained_workdir, attacks="fgsm,nonsense")
  process = subprocess.run(
      [sys.executable, "-m", "clead_jax.evaluate", "--workdir", untrained_workdir,
       "--checkpoint=7"], cwd=REPO, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert process.returncode == 2, process.stderr
  lines = [line for line in process.stderr.splitlines() if line.strip()]
  assert lines[-1].startswith("error: --checkpoint=7") and "available steps: [5]" in lines[-1]


def test_evaluate_command_noindicators_leaves_them_out(untrained_workdir):
  """The command's --noindicators: the report of the same evaluation keeps its numbers and loses
  the indicators block (of an earlier evaluation with them) and their lines in report.md."""
  run = lambda *flags: subprocess.run(
      [sys.executable, "-m", "clead_jax.evaluate", "--workdir", untrained_workdir,
       "--attacks=fgsm", "--num_examples=24", "--cpu_devices=1", *flags], cwd=REPO,
      capture_output=True, text=True, timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert run().returncode == 0
  with open(os.path.join(untrained_workdir, "report.json")) as f:
    before = json.load(f)
  process = run("--noindicators")
  assert process.returncode == 0, process.stderr
  with open(os.path.join(untrained_workdir, "report.json")) as f:
    after = json.load(f)
  assert "indicators" in before and "indicators" not in after and "warnings" in after
  assert after["robust_accuracy"]["fgsm"] == before["robust_accuracy"]["fgsm"]
  with open(os.path.join(untrained_workdir, "report.md")) as f:
    assert "Indicators of attack failure" not in f.read()


def test_evaluate_command_report_dir_keeps_the_workdirs_report(untrained_workdir, tmp_path):
  """--report_dir: an evaluation on other examples goes there; the run's report is untouched."""
  paths = [os.path.join(untrained_workdir, name) for name in ("report.json", "report.md")]
  before = [open(path).read() for path in paths]  # pylint: disable=consider-using-with
  other = str(tmp_path / "all_test")
  process = subprocess.run(
      [sys.executable, "-m", "clead_jax.evaluate", "--workdir", untrained_workdir,
       "--attacks=fgsm", "--num_examples=12", "--cpu_devices=1", "--noindicators",
       f"--report_dir={other}"], cwd=REPO, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert process.returncode == 0, process.stderr
  assert [open(path).read() for path in paths] == before  # pylint: disable=consider-using-with
  with open(os.path.join(other, "report.json")) as f:
    written = json.load(f)
  assert written["num_examples"] == 12 and list(written["robust_accuracy"]) == ["fgsm"]
  process = subprocess.run(
      [sys.executable, "-m", "clead_jax.evaluate", "--workdir", untrained_workdir,
       f"--report_dir={untrained_workdir}"], cwd=REPO, capture_output=True, text=True,
      timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert process.returncode == 2
  assert process.stderr.strip().splitlines()[-1].startswith("error: --report_dir")
