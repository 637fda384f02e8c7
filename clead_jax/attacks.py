"""White-box attacks in [0, 1] pixel space, built from small pieces: init, step, project, loop.

An attack is a pure function
  attack(apply_fn, variables, x, y, key, *, epsilon, step_size, steps, ...) -> x_adv
where `apply_fn(variables, x) -> (logits, embedding)` and the objective maps
(logits, embedding, y) to the scalar the attack maximises. The gradient is `jax.grad` on the
input, the loop is `lax.fori_loop`, every iterate is projected onto the epsilon-ball and the box,
and the result carries no gradient.

`key` is either one PRNG key or one key per example; per-example keys make the random start of
an example independent of the batch it is evaluated in. The shared pieces (norms, projection,
random starts, keys) live in clead_jax/perturbation.py; AutoAttack lives in clead_jax/autoattack/.
"""

from typing import Callable

import jax
import jax.numpy as jnp

from clead_jax import losses
from clead_jax import perturbation
from clead_jax.perturbation import expand, project

NORMS = perturbation.NORMS
# The paper's evaluation protocol (a transfer attack from a standard surrogate): PGD-3 with step
# 3/8 epsilon (3/255 at 8/255), no random start. evaluation/transfer.py runs it.
TRANSFER_STEPS = 3
TRANSFER_STEP_DIVISOR = 8 / 3


def ce_objective(logits, embedding, labels):
  del embedding
  return jnp.sum(losses.cross_entropy(logits, labels))


def margin_objective(logits, embedding, labels):
  del embedding
  return jnp.sum(losses.margin(logits, labels))


def pgd(apply_fn: Callable, variables, x, y, key, *, epsilon, step_size, steps, norm="linf",
        init="uniform", objective: Callable = ce_objective, keep_misclassified=False, unroll=1,
        trace=False):
  """Projected gradient ascent (Madry et al. 2018) on `objective`.

  With keep_misclassified, an example keeps the first iterate that the model misclassified, so
  more steps can never make the attack weaker (used in evaluation). `unroll` is the fori_loop's
  unroll factor (1: one compiled body; `steps`: no loop at all). With trace, returns
  (x_adv, perturbation.Trace) over the steps' iterates and the last one (evaluation objectives
  only: the trace needs the objective of each example alone).
  """
  perturbation.check_norm(norm)

  def loss_and_outputs(x_adv):
    logits, embedding = apply_fn(variables, x_adv)
    return objective(logits, embedding, y), (logits, embedding)

  grad_fn = jax.grad(loss_and_outputs, has_aux=True)

  def body(i, carry):
    x_adv, x_best, fooled, record = carry
    grad, (logits, embedding) = grad_fn(x_adv)
    if keep_misclassified:
      newly = (jnp.argmax(logits, axis=-1) != y) & ~fooled
      x_best = jnp.where(expand(newly, x_adv), x_adv, x_best)
      fooled = fooled | newly
    if trace:
      record = _record_step(record, i, per_example_objective(objective, logits, embedding, y),
                            jnp.argmax(logits, axis=-1) != y, grad)
    x_adv = project(perturbation.ascent_step(x_adv, grad, step_size, norm), x, epsilon, norm)
    return x_adv, x_best, fooled, record

  x_start = project(perturbation.random_init(key, x, epsilon, norm, init), x, epsilon, norm)
  fooled = jnp.zeros(x.shape[0], dtype=bool)
  record = None
  if trace:
    record = perturbation.Trace(jnp.zeros((steps + 1, x.shape[0]), x.dtype), fooled, fooled, fooled)
  x_adv, x_best, fooled, record = jax.lax.fori_loop(
      0, steps, body, (x_start, x_start, fooled, record), unroll=min(unroll, steps))
  if trace:  # the last iterate, which no step looked at
    logits, embedding = apply_fn(variables, x_adv)
    record = _record_step(record, steps, per_example_objective(objective, logits, embedding, y),
                          jnp.argmax(logits, axis=-1) != y, None)
  if keep_misclassified:
    x_adv = jnp.where(expand(fooled, x_adv), x_best, x_adv)
  x_adv = jax.lax.stop_gradient(x_adv)
  return (x_adv, jax.lax.stop_gradient(record)) if trace else x_adv


def per_example_objective(objective, logits, embedding, labels):
  """The objective of each example alone (the evaluation objectives are sums over examples)."""
  return jax.vmap(lambda z, e, t: objective(z[None], None if e is None else e[None], t[None]))(
      logits, embedding, labels)


def _record_step(record, i, losses, misclassified, grad):
  """The trace after iterate i (grad: the gradient taken there, None for the last iterate)."""
  zero, non_finite = record.start_gradient_zero, record.start_gradient_non_finite
  if grad is not None:
    zero_now, non_finite_now = perturbation.gradient_flags(grad)
    zero, non_finite = jnp.where(i == 0, zero_now, zero), jnp.where(i == 0, non_finite_now,
                                                                     non_finite)
  return perturbation.Trace(record.losses.at[i].set(losses),
                            record.misclassified | misclassified, zero, non_finite)


def fgsm(apply_fn, variables, x, y, key, *, epsilon, norm="linf", objective=ce_objective,
         init="none"):
  """Fast gradient (sign) method: one step of size epsilon (Goodfellow et al. 2015), from x or,
  with init='uniform', from a random point of the ball."""
  return pgd(apply_fn, variables, x, y, key, epsilon=epsilon, step_size=epsilon, steps=1,
             norm=norm, init=init, objective=objective)


FGSM_RS_STEP = 1.25  # Wong et al. 2020: the step is 1.25 epsilon


def fgsm_random_start(apply_fn, variables, x, y, key, *, epsilon, norm="linf",
                      objective=ce_objective):
  """FGSM from a uniform start with step 1.25 epsilon (Wong et al. 2020, 'fast is better')."""
  return pgd(apply_fn, variables, x, y, key, epsilon=epsilon, step_size=FGSM_RS_STEP * epsilon,
             steps=1, norm=norm, init="uniform", objective=objective)


NFGSM_NOISE = 2.0  # de Jorge et al. 2022: uniform noise of radius k = 2 epsilon
NFGSM_STEP = 1.0  # ... and one step of epsilon


def nfgsm(apply_fn, variables, x, y, key, *, epsilon, norm="linf", objective=ce_objective,
          noise=NFGSM_NOISE, step=NFGSM_STEP):
  """N-FGSM (de Jorge et al. 2022, "Make Some Noise"): from x plus uniform noise of radius
  noise * epsilon (clipped to the box [0, 1]), one ascent step of step * epsilon, then only
  clipped to the box: neither the noise nor the step is projected back to the epsilon-ball, so
  x_adv may lie up to (noise + step) epsilon from x. A training attack only."""
  perturbation.check_norm(norm)
  x_noisy = perturbation.random_init(key, x, noise * epsilon, norm, "uniform")

  def objective_at(x_adv):
    logits, embedding = apply_fn(variables, x_adv)
    return objective(logits, embedding, y)

  grad = jax.grad(objective_at)(x_noisy)
  x_adv = jnp.clip(perturbation.ascent_step(x_noisy, grad, step * epsilon, norm), 0.0, 1.0)
  return jax.lax.stop_gradient(x_adv)


# Training attacks by name (config.attack.name): attack(apply_fn, variables, x, y, key, *,
# attack_config, init, objective) -> x_adv. `init` is the start the method asks for
# (methods.Context derives it from attack.random_start). Only PGD takes attack.step_size and
# attack.steps: FGSM steps by epsilon, FGSM-RS by 1.25 epsilon from a uniform start, N-FGSM by
# attack.nfgsm_step epsilon from noise of radius attack.nfgsm_noise epsilon (its own start).
TRAIN_ATTACKS = {
    "fgsm": lambda apply_fn, variables, x, y, key, *, attack_config, init, objective: fgsm(
        apply_fn, variables, x, y, key, epsilon=attack_config.epsilon, norm=attack_config.norm,
        objective=objective, init=init),
    "fgsm_rs": lambda apply_fn, variables, x, y, key, *, attack_config, init, objective: (
        fgsm_random_start(apply_fn, variables, x, y, key, epsilon=attack_config.epsilon,
                          norm=attack_config.norm, objective=objective)),
    "pgd": lambda apply_fn, variables, x, y, key, *, attack_config, init, objective: pgd(
        apply_fn, variables, x, y, key, epsilon=attack_config.epsilon,
        step_size=attack_config.step_size, steps=attack_config.steps, norm=attack_config.norm,
        init=init, objective=objective, unroll=attack_config.unroll),
    "nfgsm": lambda apply_fn, variables, x, y, key, *, attack_config, init, objective: nfgsm(
        apply_fn, variables, x, y, key, epsilon=attack_config.epsilon, norm=attack_config.norm,
        objective=objective, noise=attack_config.nfgsm_noise, step=attack_config.nfgsm_step),
}


def _strong_pgd(steps, step_divisor, objective=ce_objective):
  """Evaluation PGD: uniform random start, step epsilon/divisor, keeps misclassified iterates."""
  def attack(apply_fn, variables, x, y, key, *, epsilon, norm, trace=False):
    return pgd(apply_fn, variables, x, y, key, epsilon=epsilon, step_size=epsilon / step_divisor,
               steps=steps, norm=norm, init="uniform", objective=objective,
               keep_misclassified=True, trace=trace)
  return attack


# The evaluation suite: name -> attack(apply_fn, variables, x, y, key, *, epsilon, norm) -> x_adv.
# epsilon may be a traced scalar, so one compiled attack serves the whole robustness curve.
EVAL_ATTACKS = {
    "fgsm": lambda apply_fn, variables, x, y, key, *, epsilon, norm: fgsm(
        apply_fn, variables, x, y, key, epsilon=epsilon, norm=norm),
    "pgd20": _strong_pgd(20, 4),  # 20 steps of epsilon/4 (e.g. 2/255 at 8/255)
    # 100 steps of epsilon/4. Evaluation gives every attack the same per-example key, so PGD-100
    # starts where PGD-20 starts and walks the same first 20 steps: with keep_misclassified it is
    # at least as strong as PGD-20 on every example, and the two differ by what 80 more steps find.
    "pgd100": _strong_pgd(100, 4),
    "cw": _strong_pgd(100, 10, margin_objective),  # CW-Linf: PGD-100 on the margin loss
}


def transfer_pgd3(surrogate_apply_fn, surrogate_variables, x, y, key, *, epsilon, norm):
  """The paper's protocol: PGD-3 (step 3/8 epsilon, no random start) on a surrogate network;
  the points it makes are then shown to the defended model (a black-box transfer attack)."""
  return pgd(surrogate_apply_fn, surrogate_variables, x, y, key, epsilon=epsilon,
             step_size=epsilon / TRANSFER_STEP_DIVISOR, steps=TRANSFER_STEPS, norm=norm,
             init="none", keep_misclassified=False)
