"""Checks that flag a suspect robustness evaluation, in the spirit of fra31/auto-attack's
checks.py. Each returns warnings (one line each, with counts) for the report:

  black_box_warnings: Square (black-box) fooled points that every white-box stage before it
    missed: the gradients mislead the white-box attacks (gradient masking).
  monotonicity_warnings: a stronger attack (more steps, restarts or stages) left a higher
    accuracy than a weaker one, or the robustness curve rises with epsilon.
  settings_warnings: AutoAttack ran with settings other than the reference's (fewer iterations,
    queries or targets): its numbers are not AutoAttack's.
  gradient_warnings: the input gradient of the loss is zero or non-finite on some points, where
    gradient-based attacks cannot work (saturated softmax, numerical trouble).
"""

import jax
import jax.numpy as jnp
import numpy as np

from clead_jax import input_pipeline
from clead_jax import losses

TOLERANCE = 0.005  # accuracy a stronger attack may exceed a weaker one by (sampling noise)
# Pairs where the stronger attack contains the weaker one (PGD-100 walks PGD-20's first 20 steps
# from the same start and keeps the first misclassified iterate): no tolerance at all.
EXACT = (("pgd20", "pgd100"),)
# (weaker, stronger) attacks of the suite: the stronger should never leave a higher accuracy.
STRONGER_THAN = (("fgsm", "pgd20"), ("pgd20", "pgd100"), ("pgd20", "autoattack"),
                 ("pgd100", "autoattack"), ("cw", "autoattack"),
                 ("autoattack", "autoattack_plus"), ("pgd20", "autoattack_plus"),
                 ("pgd100", "autoattack_plus"), ("cw", "autoattack_plus"))


def settings_warnings(settings, names):
  """`settings`: what the Evaluator passed to autoattack.versions.stages(); `names`: the
  AutoAttack versions that ran with them."""
  if not settings or not names:
    return []
  given = ", ".join(f"{key}={value}" for key, value in sorted(settings.items()))
  return [f"{', '.join(names)} ran with settings other than the reference's ({given}): a quick "
          "look, weaker than AutoAttack; do not report these numbers as AutoAttack"]


def black_box_warnings(results):
  """`results`: autoattack.Result of each AutoAttack version that ran."""
  warnings = []
  for result in results:
    for index, (name, black_box) in enumerate(zip(result.stage_names, result.black_box)):
      if not black_box:
        continue
      before = result.robust_after[index - 1] if index else result.clean
      fooled = int(np.sum(before & ~result.robust_after[index]))
      if fooled:
        white_box = [n for n, b in zip(result.stage_names[:index], result.black_box) if not b]
        warnings.append(
            f"{result.name}: the black-box {name} attack fooled {fooled} of {len(result.clean)} "
            f"points that every white-box attack before it ({', '.join(white_box)}) missed; "
            "the gradients may be masked, so white-box accuracies overstate robustness")
  return warnings


def monotonicity_warnings(robust_accuracy, curve=None, num_examples=None):
  """Stronger attacks must not leave higher accuracy; the curve must not rise with epsilon."""
  warnings = []
  for weaker, stronger in STRONGER_THAN:
    if weaker in robust_accuracy and stronger in robust_accuracy:
      gap = robust_accuracy[stronger] - robust_accuracy[weaker]
      if gap > (0.0 if (weaker, stronger) in EXACT else TOLERANCE):
        k = round(gap * num_examples) if num_examples else 0
        count = f" ({k} example{'' if k == 1 else 's'})" if num_examples else ""
        warnings.append(
            f"{stronger} leaves a higher accuracy than the weaker {weaker}: "
            f"{robust_accuracy[stronger]:.4f} > {robust_accuracy[weaker]:.4f} by {gap:.4f}"
            f"{count}; more steps, restarts or attacks should never help the model: the attack "
            "is not converging (gradient masking?)")
  if curve:
    accuracy, epsilons = curve["accuracy"], curve["epsilon"]
    rises = [(epsilons[i + 1], accuracy[i + 1] - accuracy[i]) for i in range(len(accuracy) - 1)
             if accuracy[i + 1] > accuracy[i]]
    if rises:
      at, rise = max(rises, key=lambda r: r[1])
      warnings.append(
          f"the robustness curve ({curve['attack']}) is not monotone in epsilon: accuracy rises "
          f"at {len(rises)} of {len(accuracy) - 1} steps (largest +{rise:.4f}, at epsilon "
          f"{at:.4g}); a larger ball must not leave more points robust")
  return warnings


def input_gradient_fn(apply_fn):
  """fn(variables, images, labels, indices) -> (zero, non_finite) per example: whether the input
  gradient of the cross-entropy is exactly zero / has a non-finite entry."""
  def fn(variables, images, labels, indices):
    del indices
    x = input_pipeline.to_float(images)
    grad = jax.grad(lambda x_in: jnp.sum(losses.cross_entropy(apply_fn(variables, x_in)[0],
                                                              labels)))(x)
    flat = grad.reshape(grad.shape[0], -1)
    return jnp.stack([jnp.all(flat == 0, -1), ~jnp.all(jnp.isfinite(flat), -1)], -1)
  return fn


def gradient_warnings(zero, non_finite):
  """`zero`, `non_finite`: per-example flags from input_gradient_fn."""
  n, warnings = len(zero), []
  if np.sum(zero):
    warnings.append(
        f"the input gradient of the cross-entropy loss is exactly zero at {int(np.sum(zero))} of "
        f"{n} clean points (saturated softmax?): gradient-based attacks on the CE loss cannot "
        "move there; rely on the DLR-loss and black-box stages")
  if np.sum(non_finite):
    warnings.append(
        f"the input gradient of the cross-entropy loss is not finite at "
        f"{int(np.sum(non_finite))} of {n} clean points: gradient-based attacks are unreliable "
        "there")
  return warnings
