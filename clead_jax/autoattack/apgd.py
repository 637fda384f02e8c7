"""APGD (Croce & Hein 2020, arXiv:2003.01690): PGD with momentum and a step size that halves at
checkpoints where the loss stopped rising, restarting from the best point. L-inf and L2; the CE
and DLR losses, untargeted and targeted (APGD-T: targeted DLR against the top-k classes).

Defaults follow fra31/auto-attack (autoattack/autopgd_base.py, APGDAttack and
APGDAttack_targeted): 100 iterations, first step 2 epsilon, momentum 0.75, rho 0.75, checkpoint
intervals of 22%, then 3% shorter each time down to 6% of the iterations, a start on the sphere
of radius epsilon, 9 target classes for the targeted version.
Two deliberate differences: the oscillation count of the first interval compares with the
starting point's loss, as in the paper (the reference compares with a zero-filled slot), and on a
deterministic model the EoT samples are identical, so only one is computed.
"""

import jax
import jax.numpy as jnp

from clead_jax import losses
from clead_jax import perturbation
from clead_jax.autoattack import common

N_ITER = 100  # autopgd_base.py: n_iter=100
RHO = 0.75  # autopgd_base.py: rho=.75, the oscillation threshold
MOMENTUM = 0.75  # autopgd_base.py: a = 0.75 (1.0 at the first step)
FIRST_STEP = 2.0  # autopgd_base.py: step_size = 2 * eps for Linf and L2
N_TARGET_CLASSES = 9  # APGDAttack_targeted: n_target_classes=9
EOT_ITER = 20  # autoattack.py, version 'rand': apgd.eot_iter = 20
LOSSES = ("ce", "dlr")


def _sorted_logits(logits):
  return jnp.sort(logits, axis=-1)


def ce_loss(logits, y, target):
  del target
  return losses.cross_entropy(logits, y)


def dlr_loss(logits, y, target):
  """Difference of logits ratio: -(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3)."""
  del target
  z_sorted = _sorted_logits(logits)
  z_y = jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0]
  top_is_y = jnp.argmax(logits, axis=-1) == y
  best_other = jnp.where(top_is_y, z_sorted[:, -2], z_sorted[:, -1])
  return -(z_y - best_other) / (z_sorted[:, -1] - z_sorted[:, -3] + 1e-12)


def ce_targeted_loss(logits, y, target):
  del y
  return -losses.cross_entropy(logits, target)


def dlr_targeted_loss(logits, y, target):
  """Targeted DLR: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)."""
  z_sorted = _sorted_logits(logits)
  z_y = jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0]
  z_t = jnp.take_along_axis(logits, target[:, None], axis=-1)[:, 0]
  return -(z_y - z_t) / (z_sorted[:, -1] - 0.5 * (z_sorted[:, -3] + z_sorted[:, -4]) + 1e-12)


_LOSS_FNS = {("ce", False): ce_loss, ("dlr", False): dlr_loss,
             ("ce", True): ce_targeted_loss, ("dlr", True): dlr_targeted_loss}
_MIN_CLASSES = {("dlr", False): 3, ("dlr", True): 4}


def checkpoint_schedule(n_iter):
  """(first interval, shortest interval, decrease) in iterations, as autopgd_base.py."""
  return (max(int(0.22 * n_iter), 1), max(int(0.06 * n_iter), 1), max(int(0.03 * n_iter), 1))


def checkpoints(n_iter):
  """The iterations (counted from 1) after which the step size may halve; for the tests."""
  first, shortest, decrease = checkpoint_schedule(n_iter)
  points, at, interval = [], 0, first
  while at + interval <= n_iter:
    at += interval
    points.append(at)
    interval = max(interval - decrease, shortest)
  return points


def apgd_run(apply_fn, variables, x, y, key, *, epsilon, norm, loss="ce", target=None,
             n_iter=N_ITER, rho=RHO, eot_iter=1, stochastic=False, trace=False):
  """One run of APGD from a random start; returns (x_adv, fooled), with trace=True
  (x_adv, fooled, perturbation.Trace) over the start and every iterate.

  x_adv is, per example, the last iterate the model misclassified, or else the iterate of highest
  loss. With stochastic=True, apply_fn(variables, x, keys) takes one key per example and the
  gradient is averaged over eot_iter samples (Expectation over Transformation).
  """
  perturbation.check_norm(norm)
  loss_fn = _LOSS_FNS[(loss, target is not None)]
  start_keys, sample_keys = perturbation.split_keys(perturbation.per_example_keys(key, x.shape[0]), 2)
  expand = lambda v: perturbation.expand(v, x)

  def total_loss(x_in, keys):
    logits, _ = apply_fn(variables, x_in, keys) if stochastic else apply_fn(variables, x_in)
    per_example = loss_fn(logits, y, target)
    return jnp.sum(per_example), (per_example, logits)

  grad_fn = jax.grad(total_loss, has_aux=True)

  def loss_logits_grad(x_adv, step):
    if not stochastic:
      grad, (loss_value, logits) = grad_fn(x_adv, None)
      return loss_value, logits, grad
    step_keys = perturbation.fold_in(sample_keys, step)

    def sample(carry, j):
      grad, (loss_value, logits) = grad_fn(x_adv, perturbation.fold_in(step_keys, j))
      return carry, (grad, loss_value, logits)

    _, (grads, loss_values, logits) = jax.lax.scan(sample, None, jnp.arange(eot_iter))
    return jnp.mean(loss_values, 0), logits[-1], jnp.mean(grads, 0)

  first_interval, shortest_interval, decrease = checkpoint_schedule(n_iter)
  x_start = jnp.clip(
      x + epsilon * common.unit_direction(start_keys, x.shape[1:], norm, x.dtype), 0.0, 1.0)
  loss0, logits0, grad0 = loss_logits_grad(x_start, 0)
  carry = dict(
      x_adv=x_start, x_prev=x_start, grad=grad0,
      step_size=jnp.full(x.shape[0], FIRST_STEP, x.dtype) * epsilon,
      x_max=x_start, loss_max=loss0, grad_max=grad0,  # the best point, to restart from
      x_fool=x_start, fooled=jnp.argmax(logits0, -1) != y,
      loss_prev=loss0, increases=jnp.zeros(x.shape[0], jnp.int32),
      loss_max_at_check=loss0, reduced_at_check=jnp.ones(x.shape[0], bool),
      interval=jnp.int32(first_interval), since_check=jnp.int32(0))
  if trace:
    carry["losses"] = jnp.zeros((n_iter + 1, x.shape[0]), loss0.dtype).at[0].set(loss0)

  def body(i, c):
    c = dict(c)
    a = jnp.where(i > 0, MOMENTUM, 1.0)
    x_step = perturbation.project(perturbation.ascent_step(c["x_adv"], c["grad"], expand(c["step_size"]),
                                                 norm), x, epsilon, norm)
    x_new = perturbation.project(c["x_adv"] + a * (x_step - c["x_adv"])
                            + (1.0 - a) * (c["x_adv"] - c["x_prev"]), x, epsilon, norm)
    c["x_prev"], c["x_adv"] = c["x_adv"], x_new
    loss_value, logits, c["grad"] = loss_logits_grad(x_new, i + 1)
    if trace:
      c["losses"] = c["losses"].at[i + 1].set(loss_value)

    wrong = jnp.argmax(logits, -1) != y
    c["x_fool"] = jnp.where(expand(wrong), x_new, c["x_fool"])
    c["fooled"] = c["fooled"] | wrong
    improved = loss_value > c["loss_max"]
    c["x_max"] = jnp.where(expand(improved), x_new, c["x_max"])
    c["grad_max"] = jnp.where(expand(improved), c["grad"], c["grad_max"])
    c["loss_max"] = jnp.where(improved, loss_value, c["loss_max"])
    c["increases"] = c["increases"] + (loss_value > c["loss_prev"]).astype(jnp.int32)
    c["loss_prev"] = loss_value

    # Checkpoint: halve the step where the loss rose in at most rho of the interval's steps, or
    # where the best loss did not improve since the last checkpoint and the step was not just
    # halved; those examples restart from their best point.
    c["since_check"] = c["since_check"] + 1
    at_check = c["since_check"] == c["interval"]
    oscillating = c["increases"] <= c["interval"] * rho
    stalled = ~c["reduced_at_check"] & (c["loss_max_at_check"] >= c["loss_max"])
    reduce = at_check & (oscillating | stalled)
    c["step_size"] = jnp.where(reduce, c["step_size"] / 2.0, c["step_size"])
    c["x_adv"] = jnp.where(expand(reduce), c["x_max"], c["x_adv"])
    c["grad"] = jnp.where(expand(reduce), c["grad_max"], c["grad"])
    c["reduced_at_check"] = jnp.where(at_check, reduce, c["reduced_at_check"])
    c["loss_max_at_check"] = jnp.where(at_check, c["loss_max"], c["loss_max_at_check"])
    c["increases"] = jnp.where(at_check, 0, c["increases"])
    c["interval"] = jnp.where(at_check, jnp.maximum(c["interval"] - decrease, shortest_interval),
                              c["interval"])
    c["since_check"] = jnp.where(at_check, 0, c["since_check"])
    return c

  c = jax.lax.fori_loop(0, n_iter, body, carry)
  x_adv = jnp.where(expand(c["fooled"]), c["x_fool"], c["x_max"])
  if trace:
    record = perturbation.Trace(c["losses"], c["fooled"], *perturbation.gradient_flags(grad0))
    return (perturbation.finish(x_adv, x, epsilon, norm), c["fooled"],
            jax.lax.stop_gradient(record))
  return perturbation.finish(x_adv, x, epsilon, norm), c["fooled"]


def num_runs(num_classes, *, targeted, n_restarts=1, n_target_classes=N_TARGET_CLASSES):
  """Runs of APGD: restarts, times the target classes (at most num_classes - 1) if targeted."""
  return n_restarts * (min(n_target_classes, num_classes - 1) if targeted else 1)


def check_classes(num_classes, loss, targeted):
  needed = _MIN_CLASSES.get((loss, targeted), 2)
  if num_classes < needed:
    raise ValueError(f"APGD with the {'targeted ' if targeted else ''}{loss} loss needs at "
                     f"least {needed} classes; the model has {num_classes}")


def make_run(*, epsilon, norm, loss="ce", targeted=False, n_restarts=1, n_iter=N_ITER, rho=RHO,
             eot_iter=1, stochastic=False, trace=False):
  """run(apply_fn, variables, x, y, keys, run_index) -> x_adv: restart run_index % n_restarts,
  and for APGD-T the target of rank 2 + run_index // n_restarts in the clean logits (as
  APGDAttack_targeted.perturb). With trace=True the run returns (x_adv, perturbation.Trace)."""
  if loss not in LOSSES:
    raise ValueError(f"loss={loss!r}; choose one of {LOSSES}")

  def run(apply_fn, variables, x, y, keys, run_index):
    target = None
    if targeted:
      logits, _ = (apply_fn(variables, x, perturbation.fold_in(keys, 0)) if stochastic
                   else apply_fn(variables, x))
      target = common.target_classes(logits, 2 + run_index // n_restarts)
    out = apgd_run(apply_fn, variables, x, y, keys, epsilon=epsilon, norm=norm, loss=loss,
                   target=target, n_iter=n_iter, rho=rho, eot_iter=eot_iter,
                   stochastic=stochastic, trace=trace)
    return (out[0], out[2]) if trace else out[0]

  return run


def apgd(apply_fn, variables, x, y, key, *, epsilon, norm="linf", loss="ce", targeted=False,
         n_iter=N_ITER, n_restarts=1, n_target_classes=N_TARGET_CLASSES, rho=RHO, eot_iter=1,
         stochastic=False):
  """APGD (targeted: APGD-T); an example keeps the first run (restart, target) that fools it.

  For a stochastic model the restart loop judges success on one fixed sample per example.
  """
  perturbation.check_norm(norm)
  num_classes = common.num_classes_of(apply_fn, variables, x, stochastic)
  check_classes(num_classes, loss, targeted)
  run = make_run(epsilon=epsilon, norm=norm, loss=loss, targeted=targeted, n_restarts=n_restarts,
                 n_iter=n_iter, rho=rho, eot_iter=eot_iter, stochastic=stochastic)
  keys, check_keys = perturbation.split_keys(perturbation.per_example_keys(key, x.shape[0]), 2)
  predict_fn = common.predictor(apply_fn, variables, check_keys if stochastic else None)
  x_adv, _ = common.over_runs(
      lambda x_in, y_in, run_keys, r: run(apply_fn, variables, x_in, y_in, run_keys, r),
      num_runs(num_classes, targeted=targeted, n_restarts=n_restarts,
               n_target_classes=n_target_classes),
      predict_fn, x, y, keys)
  return perturbation.finish(x_adv, x, epsilon, norm)
