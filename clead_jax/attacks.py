"""White-box attacks in [0, 1] pixel space, built from small pieces: init, step, project, loop.

An attack is a pure function
  attack(apply_fn, variables, x, y, key, *, epsilon, step_size, steps, ...) -> x_adv
where `apply_fn(variables, x) -> (logits, embedding)` and the objective maps
(logits, embedding, y) to the scalar the attack maximises. The gradient is `jax.grad` on the
input, the loop is `lax.fori_loop`, every iterate is projected onto the epsilon-ball and the box,
and the result carries no gradient.

`key` is either one PRNG key or one key per example; per-example keys make the random start of
an example independent of the batch it is evaluated in.
"""

from typing import Callable

import jax
import jax.numpy as jnp

from clead_jax import losses

NORMS = ("linf", "l2")
INITS = ("none", "uniform", "normal")


def _per_example_keys(key, batch_size):
  return jax.random.split(key, batch_size) if key.shape == () else key


def _flat_norm(v):
  return jnp.sqrt(jnp.sum(jnp.square(v.reshape(v.shape[0], -1)), axis=-1))


def _expand(v, like):
  return v.reshape((-1,) + (1,) * (like.ndim - 1))


def random_init(key, x, epsilon, norm, init="uniform"):
  """Starting point: x itself, uniform in the epsilon-ball, or x + 0.001 N(0, 1) (TRADES)."""
  if init == "none":
    return x
  keys = _per_example_keys(key, x.shape[0])
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


def project(x_adv, x, epsilon, norm):
  """Projects x_adv onto the epsilon-ball around x, then onto the box [0, 1]."""
  delta = x_adv - x
  if norm == "linf":
    delta = jnp.clip(delta, -epsilon, epsilon)
  else:
    scale = jnp.minimum(1.0, epsilon / jnp.maximum(_flat_norm(delta), 1e-12))
    delta = delta * _expand(scale, delta)
  return jnp.clip(x + delta, 0.0, 1.0)


def ascent_step(x_adv, grad, step_size, norm):
  """Steepest-ascent step for the norm: the sign for L-inf, the unit gradient for L2."""
  if norm == "linf":
    return x_adv + step_size * jnp.sign(grad)
  return x_adv + step_size * grad / _expand(jnp.maximum(_flat_norm(grad), 1e-12), grad)


def ce_objective(logits, embedding, labels):
  del embedding
  return jnp.sum(losses.cross_entropy(logits, labels))


def margin_objective(logits, embedding, labels):
  del embedding
  return jnp.sum(losses.margin(logits, labels))


def pgd(apply_fn: Callable, variables, x, y, key, *, epsilon, step_size, steps, norm="linf",
        init="uniform", objective: Callable = ce_objective, keep_misclassified=False, unroll=1):
  """Projected gradient ascent (Madry et al. 2018) on `objective`.

  With keep_misclassified, an example keeps the first iterate that the model misclassified, so
  more steps can never make the attack weaker (used in evaluation). `unroll` is the fori_loop's
  unroll factor (1: one compiled body; `steps`: no loop at all).
  """
  if norm not in NORMS:
    raise ValueError(f"norm={norm!r}; choose one of {NORMS}")

  def loss_and_logits(x_adv):
    logits, embedding = apply_fn(variables, x_adv)
    return objective(logits, embedding, y), logits

  grad_fn = jax.grad(loss_and_logits, has_aux=True)

  def body(_, carry):
    x_adv, x_best, fooled = carry
    grad, logits = grad_fn(x_adv)
    if keep_misclassified:
      newly = (jnp.argmax(logits, axis=-1) != y) & ~fooled
      x_best = jnp.where(_expand(newly, x_adv), x_adv, x_best)
      fooled = fooled | newly
    x_adv = project(ascent_step(x_adv, grad, step_size, norm), x, epsilon, norm)
    return x_adv, x_best, fooled

  x_start = project(random_init(key, x, epsilon, norm, init), x, epsilon, norm)
  fooled = jnp.zeros(x.shape[0], dtype=bool)
  x_adv, x_best, fooled = jax.lax.fori_loop(0, steps, body, (x_start, x_start, fooled),
                                            unroll=min(unroll, steps))
  if keep_misclassified:
    x_adv = jnp.where(_expand(fooled, x_adv), x_best, x_adv)
  return jax.lax.stop_gradient(x_adv)


def fgsm(apply_fn, variables, x, y, key, *, epsilon, norm="linf", objective=ce_objective, **_):
  """Fast gradient (sign) method: one step of size epsilon from x (Goodfellow et al. 2015)."""
  return pgd(apply_fn, variables, x, y, key, epsilon=epsilon, step_size=epsilon, steps=1,
             norm=norm, init="none", objective=objective)


def fgsm_random_start(apply_fn, variables, x, y, key, *, epsilon, step_size=None, norm="linf",
                      objective=ce_objective, **_):
  """FGSM from a uniform start with step 1.25 epsilon (Wong et al. 2020, 'fast is better')."""
  step_size = 1.25 * epsilon if step_size is None else step_size
  return pgd(apply_fn, variables, x, y, key, epsilon=epsilon, step_size=step_size, steps=1,
             norm=norm, init="uniform", objective=objective)


# Training attacks by name (config.attack.name).
TRAIN_ATTACKS = {
    "fgsm": fgsm,
    "fgsm_rs": fgsm_random_start,
    "pgd": pgd,
}


def _strong_pgd(steps, step_divisor, objective=ce_objective):
  """Evaluation PGD: uniform random start, step epsilon/divisor, keeps misclassified iterates."""
  def attack(apply_fn, variables, x, y, key, *, epsilon, norm):
    return pgd(apply_fn, variables, x, y, key, epsilon=epsilon, step_size=epsilon / step_divisor,
               steps=steps, norm=norm, init="uniform", objective=objective,
               keep_misclassified=True)
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


def _autoattack(version):
  """An AutoAttack version (clead_jax/autoattack) as one jitted attack: every stage runs on the
  whole batch. evaluation.evaluate runs it stage by stage on the points still robust instead, and
  reports each stage."""
  def attack(apply_fn, variables, x, y, key, *, epsilon, norm):
    # Imported here: clead_jax.autoattack builds on this module.
    from clead_jax.autoattack import autoattack  # pylint: disable=g-import-not-at-top
    return autoattack.autoattack(apply_fn, variables, x, y, key, epsilon=epsilon, norm=norm,
                                 version=version)
  return attack


# AutoAttack standard: APGD-CE, APGD-T, FAB-T, Square (Croce & Hein 2020). The versions plus and
# rand are evaluation names only (evaluation.parse_attack_names), run by the Runner.
EVAL_ATTACKS["autoattack"] = _autoattack("standard")
