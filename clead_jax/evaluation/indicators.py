"""Indicators of attack failure: does the evaluation say when an attack failed to optimise?

Pintor et al. (NeurIPS 2022, "Indicators of Attack Failure") define six indicators; the
reference AutoAttack (fra31/auto-attack, checks.py) adds checks of the model. `compute` runs them
on the first SAMPLE evaluated points (all of them on small splits) for every evaluation, and
returns the report's "indicators" block: every number, and the list of those that fired, each
with one sentence on what it means and what to do (report.md prints that list).

Per attack, for PGD-20, PGD-100 and CW (the same iterates as the evaluation: the same start
keys, read through the attack's trace) and for each APGD stage of every AutoAttack version in the
report (each stage's runs, with the Runner's keys, on the sampled points every earlier stage left
robust: the points the stage attacked), counted over the points the model classifies correctly:
  silent_success: an iterate was misclassified, but the point the attack returned is not (the
    model answers differently when asked twice, or the attack returns the wrong iterate).
  incomplete_optimisation: on a point the attack failed on, the best loss so far still rose,
    over the last LAST_STEPS iterates, by more than MIN_GAIN of the loss's range over the run
    (Pintor et al.'s rule): more steps would have helped. PGD-20's is counted but does not fire
    when PGD-100 ran without firing it: PGD-100 continues PGD-20 (same start, 80 more steps), so
    the report already holds the longer run (CONTINUED_BY).
  unavailable_gradients: the input gradient of the attack's loss at its start is all zero or
    not finite (a non-differentiable or saturated model).
  unconstrained_attack_failure: the same attack (its first run) with an epsilon that spans the
    whole box (L-inf 1, L2 the box's diagonal) still does not fool the point. Must be 0: a
    classifier that is not constant can be fooled by some image.
For the model, on the sampled points:
  unstable_predictions: the mean relative change of the cross-entropy under UNSTABLE_DRAWS
    uniform perturbations in [-r/2, r/2] per input value (L2: in the ball of radius r/2), with
    r = UNSTABLE_RADIUS epsilon, each point's value capped at 1; fires above UNSTABLE_THRESHOLD.
    Pintor et al. take r = epsilon at CIFAR's 8/255, where a smooth loss barely moves; at the
    digits' epsilon of 0.2 the loss of the trained quickstart model moves by 28% on average, so
    the draws here are ten times smaller: a smooth loss changes in proportion to r, a random or
    shattered one does not.
  randomised_outputs (reference): two forward passes of the same inputs differ (L2-normalised
    logits by more than RANDOMISED_TOLERANCE, or a prediction).
  softmax_outputs (reference): every output row is in [0, 1] and sums to 1 (probabilities,
    not logits).
From the per-example results of the whole evaluation:
  transfer_failure: points a transfer attack fooled that every white-box attack missed (only
    when a transfer attack ran).
  square_beats_white_box (reference): Square fooled more than SQUARE_MARGIN of the points after
    every white-box stage before it had failed.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from clead_jax import attacks
from clead_jax import input_pipeline
from clead_jax import losses as losses_lib
from clead_jax import perturbation
from clead_jax.autoattack import common
from clead_jax.autoattack import versions
from clead_jax.evaluation import sharded

SAMPLE = 512  # the first SAMPLE evaluated points (the APGD-T stage costs 9 runs of 100 steps)
TRACED_ATTACKS = ("pgd20", "pgd100", "cw")  # the PGD attacks of the suite that return a trace
LAST_STEPS = 10  # Pintor et al.: the last 10 iterates
MIN_GAIN = 0.05  # ... and a rise of the best loss by more than 5% of its range
UNSTABLE_DRAWS = 32  # Pintor et al. draw 100 points; 32 keep the check cheap
UNSTABLE_RADIUS = 0.1  # r, in units of epsilon (see the module docstring)
UNSTABLE_THRESHOLD = 0.1
# A longer run of the same attack from the same start: its completeness answers the shorter one's.
CONTINUED_BY = {"pgd20": "pgd100"}
RANDOMISED_TOLERANCE = 1e-4  # checks.py check_randomized: alpha=1e-4 on L2-normalised outputs
SOFTMAX_TOLERANCE = 1e-5  # checks.py check_range_output: alpha=1e-5
SQUARE_MARGIN = 0.002  # checks.py check_square_sr: alpha=.002 of accuracy
UNSTABLE_TAG = 1_000_003  # folded into each example's key for the unstable-predictions draws

_COLUMNS = ("correct", "robust", "silent_success", "incomplete_optimisation", "zero_gradient",
            "non_finite_gradient")

ADVICE = {
    "silent_success": "an iterate was misclassified but the point the attack returned is not: "
                      "the model answers differently when asked twice (randomness?) or the "
                      "attack returns the wrong iterate; evaluate with autoattack_rand (EoT) or "
                      "fix the attack",
    "incomplete_optimisation": "on points it failed on, its best loss was still rising over the "
                               f"last {LAST_STEPS} iterates: it stopped too early; trust the "
                               "attacks with more steps (pgd100, AutoAttack) or add steps",
    "unavailable_gradients": "the input gradient of its loss is zero or not finite at its start: "
                             "gradient steps cannot move there (a non-differentiable input stage, "
                             "or a saturated softmax); trust attacks that do not need that "
                             "gradient (AutoAttack's DLR-loss and Square stages), or attack a "
                             "differentiable approximation (BPDA)",
    "unconstrained_attack_failure": "even with an epsilon spanning the whole box it cannot fool "
                                    "some correctly classified points, which any working attack "
                                    "on a non-constant classifier can: its bounded accuracies "
                                    "mean nothing; check the model (constant prediction?) and "
                                    "the attack",
    "unstable_predictions": "the cross-entropy changes a lot under small random perturbations "
                            f"(values in +-{UNSTABLE_RADIUS / 2:g} epsilon): the loss surface is "
                            "noisy or random, and gradients mislead; use EoT (autoattack_rand) "
                            "or a smoothed loss",
    "randomised_outputs": "two forward passes of the same inputs give different outputs: the "
                          "model is randomised, and attacks that see one sample are misled; "
                          "evaluate with autoattack_rand (EoT)",
    "softmax_outputs": "the model outputs probabilities (rows in [0, 1] summing to 1), not "
                       "logits: the cross-entropy of probabilities saturates and its gradients "
                       "vanish; evaluate the logits",
    "transfer_failure": "a black-box transfer attack fooled points that every white-box attack "
                        "missed: the white-box attacks fail on this model (gradient masking); "
                        "do not trust their accuracies",
    "square_beats_white_box": "the black-box Square attack fooled points that every white-box "
                              "stage before it missed: the gradients are masked; trust "
                              "AutoAttack's final number, and try an adaptive attack",
}


# --- per example, jitted --------------------------------------------------------------------------

def still_improving(losses, last=LAST_STEPS, min_gain=MIN_GAIN):
  """(B,) whether the best loss so far rose by more than min_gain of the loss's range over the
  last `last` of the iterates (losses: (iterates, B), maximised)."""
  losses = jnp.where(jnp.isfinite(losses), losses, jnp.nan)
  low, high = jnp.nanmin(losses, 0), jnp.nanmax(losses, 0)
  best = jax.lax.cummax(jnp.where(jnp.isnan(losses), -jnp.inf, losses), axis=0)
  window = min(last, losses.shape[0])
  span = jnp.where(high > low, high - low, 1.0)
  gain = (best[-1] - best[-window]) / span
  return jnp.nan_to_num(gain) > min_gain


def _flags(clean_ok, correct_after, trace):
  """(B, len(_COLUMNS)) bool of one run of an attack."""
  robust = clean_ok & correct_after
  return jnp.stack([clean_ok, robust, clean_ok & trace.misclassified & correct_after,
                    robust & ~trace.misclassified & still_improving(trace.losses),
                    clean_ok & trace.start_gradient_zero,
                    clean_ok & trace.start_gradient_non_finite], -1)


def _predicts(apply_fn, variables, x, labels):
  return jnp.argmax(apply_fn(variables, x)[0], -1) == labels


def _pgd_fn(apply_fn, attack, norm, seed):
  def fn(variables, images, labels, indices, epsilon, runs):
    del runs  # one run
    x = input_pipeline.to_float(images)
    keys = perturbation.example_keys(seed, indices)
    x_adv, trace = attack(apply_fn, variables, x, labels, keys, epsilon=epsilon, norm=norm,
                          trace=True)
    return _flags(_predicts(apply_fn, variables, x, labels),
                  _predicts(apply_fn, variables, x_adv, labels), trace)
  return fn


def _apgd_fn(apply_fn, version, index, num_classes, norm, seed, settings):
  """The first `runs` runs of APGD stage `index`, with the Runner's keys: flags that hold for
  some run (robust: for every run)."""
  def fn(variables, images, labels, indices, epsilon, runs):
    x = input_pipeline.to_float(images)
    clean_ok = _predicts(apply_fn, variables, x, labels)
    keys, _ = perturbation.split_keys(perturbation.example_keys(seed, indices), 2)
    keys = versions.stage_keys(keys, index)
    stage = versions.stages(version, num_classes, epsilon=epsilon, norm=norm, **settings)[index]

    def body(run_index, flags):
      x_adv, trace = stage.traced_run(apply_fn, variables, x, labels,
                                      perturbation.fold_in(keys, run_index), run_index)
      run = _flags(clean_ok, _predicts(apply_fn, variables, x_adv, labels), trace)
      return jnp.concatenate([flags[:, :2] & run[:, :2], flags[:, 2:] | run[:, 2:]], -1)

    start = jnp.concatenate([jnp.stack([clean_ok, clean_ok], -1),
                             jnp.zeros((x.shape[0], len(_COLUMNS) - 2), bool)], -1)
    flags = jax.lax.fori_loop(0, jnp.minimum(runs, stage.num_runs), body, start)
    # A failing run still improving counts only where no run fooled the point.
    return flags.at[:, 3].set(flags[:, 3] & flags[:, 1])
  return fn


def _logits_fn(apply_fn):
  def fn(variables, images, labels, indices):
    del labels, indices
    return apply_fn(variables, input_pipeline.to_float(images))[0].astype(jnp.float32)
  return fn


def _unstable_fn(apply_fn, norm, seed):
  """(B,) each point's mean relative change of the cross-entropy under random perturbations
  (capped at 1). The draws run in a loop, not vmapped: a randomised model draws anew each time."""
  def fn(variables, images, labels, indices, epsilon):
    x = input_pipeline.to_float(images)
    loss = losses_lib.cross_entropy(apply_fn(variables, x)[0], labels)
    scale = jnp.where(jnp.abs(loss) > 0, jnp.abs(loss), 1.0)
    keys = perturbation.example_keys(seed, indices)

    def body(draw, total):
      draw_keys = perturbation.fold_in(keys, UNSTABLE_TAG + draw)
      x_near = perturbation.random_init(draw_keys, x, UNSTABLE_RADIUS * epsilon / 2, norm,
                                        "uniform")
      near = losses_lib.cross_entropy(apply_fn(variables, x_near)[0], labels)
      return total + jnp.nan_to_num(jnp.abs(near - loss) / scale, nan=1.0, posinf=1.0)

    total = jax.lax.fori_loop(0, UNSTABLE_DRAWS, body, jnp.zeros_like(loss))
    return jnp.minimum(total / UNSTABLE_DRAWS, 1.0)
  return fn


# --- the block ------------------------------------------------------------------------------------

def unconstrained_epsilon(norm, image_shape):
  """An epsilon whose ball holds the whole box [0, 1]^d around any of its points."""
  return 1.0 if norm == "linf" else float(np.sqrt(np.prod(image_shape)))


def _compiled(evaluator, key, build, num_args):
  # The evaluator's cache: compiled once per evaluator, like its attacks.
  cache = evaluator._compiled  # pylint: disable=protected-access
  if ("indicators",) + key not in cache:
    cache[("indicators",) + key] = evaluator._jit(build(), num_args)  # pylint: disable=protected-access
  return cache[("indicators",) + key]


def _map(evaluator, fn, variables, images, labels, *args, indices=None):
  return sharded.map_examples(evaluator.mesh, evaluator.batch_size,
                              functools.partial(fn, variables), images, labels,
                              np.arange(len(labels)) if indices is None else indices, *args)


def _attack_indicators(evaluator, fn, variables, images, labels, indices, epsilon, big_epsilon,
                       num_runs=1):
  """The counts of one attack on the points `indices`: all its runs at epsilon; its first run
  at big_epsilon (one run of an unbounded attack suffices to fool any point)."""
  if not len(indices):
    flags = unbounded = np.zeros((0, len(_COLUMNS)), bool)
  else:
    flags = _map(evaluator, fn, variables, images, labels, jnp.float32(epsilon),
                 jnp.int32(num_runs), indices=indices).astype(bool)
    unbounded = _map(evaluator, fn, variables, images, labels, jnp.float32(big_epsilon),
                     jnp.int32(1), indices=indices).astype(bool)
  correct = flags[:, 0]
  return {"points": int(correct.sum()),
          "silent_success": int(flags[:, 2].sum()),
          "incomplete_optimisation": int(flags[:, 3].sum()),
          "unavailable_gradients": int((flags[:, 4] | flags[:, 5]).sum()),
          "zero_gradients": int(flags[:, 4].sum()),
          "non_finite_gradients": int(flags[:, 5].sum()),
          "unconstrained_attack_failure": int(unbounded[:, 1].sum()),
          "unconstrained_epsilon": float(big_epsilon)}


def _autoattack_settings(evaluator, name):
  """The settings of the Runner the evaluation used for `name` (tests shrink them)."""
  runner = evaluator._compiled.get(("autoattack", name))  # pylint: disable=protected-access
  return dict(runner.settings) if runner is not None else dict(evaluator.autoattack_settings)


def _model_indicators(evaluator, variables, images, labels, epsilon):
  logits_fn = _compiled(evaluator, ("logits",), lambda: _logits_fn(evaluator.apply), 0)
  first, second = (_map(evaluator, logits_fn, variables, images, labels) for _ in range(2))
  unit = lambda z: z / (np.linalg.norm(z, axis=-1, keepdims=True) + 1e-10)
  with np.errstate(invalid="ignore"):
    difference = float(np.nan_to_num(np.linalg.norm(unit(first) - unit(second), axis=-1),
                                     nan=np.inf).max(initial=0.0))
  changed = int(np.sum(np.argmax(first, -1) != np.argmax(second, -1)))
  is_softmax = bool(len(first) and np.all(first > -SOFTMAX_TOLERANCE)
                    and np.all(first < 1 + SOFTMAX_TOLERANCE)
                    and np.all(np.abs(first.sum(-1) - 1) < SOFTMAX_TOLERANCE))
  unstable_fn = _compiled(evaluator, ("unstable",),
                          lambda: _unstable_fn(evaluator.apply, evaluator.norm, evaluator.seed), 1)
  unstable = _map(evaluator, unstable_fn, variables, images, labels, jnp.float32(epsilon))
  return {"randomised_outputs": {"max_difference": difference, "predictions_changed": changed,
                                 "tolerance": RANDOMISED_TOLERANCE,
                                 "fires": bool(difference > RANDOMISED_TOLERANCE or changed)},
          "softmax_outputs": {"fires": is_softmax, "tolerance": SOFTMAX_TOLERANCE},
          "unstable_predictions": {"value": float(np.mean(unstable)) if len(unstable) else 0.0,
                                   "points_above": int(np.sum(unstable > UNSTABLE_THRESHOLD)),
                                   "threshold": UNSTABLE_THRESHOLD, "draws": UNSTABLE_DRAWS,
                                   "radius": f"{UNSTABLE_RADIUS:g} epsilon",
                                   "fires": bool(np.mean(unstable) > UNSTABLE_THRESHOLD)
                                            if len(unstable) else False}}


def _report_level(report):
  """transfer_failure and square_beats_white_box, from the per-example results of the whole
  evaluation."""
  data, flags = report.data, report.flags
  out = {"transfer_failure": {}, "square_beats_white_box": {}}
  white_box = [a for a in report.white_box_attacks() if a in flags]
  if "clean" in flags and white_box:
    robust_white = flags["clean"].copy()
    for name in white_box:
      robust_white &= flags[name]
    for name in data.get("transfer_attacks", {}):
      if name in flags:
        out["transfer_failure"][name] = int(np.sum(robust_white & ~flags[name]))
  for name in versions.ATTACK_NAMES:
    keys = [k for k in data["robust_accuracy"] if k.startswith(name + "/")]
    square = f"{name}/square"
    if square in keys and keys.index(square) > 0 and square in flags:
      before = flags.get(keys[keys.index(square) - 1])
      if before is not None:
        fooled = int(np.sum(before & ~flags[square]))
        out["square_beats_white_box"][name] = {
            "fooled": fooled, "of": int(len(before)),
            "fires": fooled > SQUARE_MARGIN * len(before)}
  return out


def _fired(block, robust_accuracy):
  """The indicators that fired, each with a message for report.md."""
  fired = []
  for attack, counts in block["attacks"].items():
    for name in ("silent_success", "incomplete_optimisation", "unavailable_gradients",
                 "unconstrained_attack_failure"):
      if name == "incomplete_optimisation" and counts.get("answered_by"):
        continue
      if counts[name]:
        fired.append({"indicator": name, "attack": attack, "count": counts[name],
                      "message": f"{name.replace('_', ' ')} ({attack}, {counts[name]} of "
                                 f"{counts['points']} points): {ADVICE[name]}."})
  for name, value in block["model"].items():
    if value["fires"]:
      detail = (f"mean relative change {value['value']:.3f} > {value['threshold']}"
                if name == "unstable_predictions" else
                f"{value['predictions_changed']} predictions changed, largest difference "
                f"{value['max_difference']:.3g}" if name == "randomised_outputs" else
                "every row")
      fired.append({"indicator": name, "attack": None,
                    "message": f"{name.replace('_', ' ')} ({detail}): {ADVICE[name]}."})
  for attack, count in block["transfer_failure"].items():
    if count:
      fired.append({"indicator": "transfer_failure", "attack": attack, "count": count,
                    "message": f"transfer failure ({attack} fooled {count} points every "
                               f"white-box attack missed): {ADVICE['transfer_failure']}."})
  for attack, value in block["square_beats_white_box"].items():
    if value["fires"]:
      fired.append({"indicator": "square_beats_white_box", "attack": attack,
                    "count": value["fooled"],
                    "message": f"Square beats white-box ({attack}: {value['fooled']} of "
                               f"{value['of']} points): {ADVICE['square_beats_white_box']}."})
  # Why AutoAttack may read lower than an attack whose indicators fired: name its APGD stages
  # that tripped none of that attack's indicators (Square and FAB have no trace; Square's own
  # check is above).
  for attack in sorted({f["attack"] for f in fired if f["attack"] in TRACED_ATTACKS}):
    failures = {f["indicator"] for f in fired if f["attack"] == attack}
    for autoattack in (a for a in versions.ATTACK_NAMES if a in robust_accuracy):
      sound = [key.split("/")[1] for key in block["attacks"] if key.startswith(autoattack + "/")
               and not any(f["attack"] == key and f["indicator"] in failures for f in fired)]
      if sound and robust_accuracy.get(attack, 0.0) > robust_accuracy[autoattack]:
        fired.append({"indicator": "why", "attack": attack,
                      "message": f"{attack} reads {robust_accuracy[attack]:.4f} but {autoattack} "
                                 f"{robust_accuracy[autoattack]:.4f}: {attack} tripped "
                                 f"{', '.join(sorted(failures)).replace('_', ' ')} above, and "
                                 f"{autoattack}'s {', '.join(sound)} did not (the DLR loss does "
                                 "not saturate with the scale of the logits, and Square needs no "
                                 f"gradient): {autoattack}'s number is the one to trust."})
  return fired


def compute(evaluator, variables, images, labels, *, epsilon, report, sample=SAMPLE):
  """The report's "indicators" block for the attacks in `report` (a report.Report holding the
  per-example results), on the first `sample` of the evaluated points."""
  n = min(len(labels), sample)
  images, labels = images[:n], labels[:n]
  big_epsilon = unconstrained_epsilon(evaluator.norm, np.shape(images)[1:])
  robust_accuracy = report.data["robust_accuracy"]
  block = {"points": int(n), "sample": f"the first {n} of the {len(report.flags.get('clean', []))}"
           " evaluated points", "attacks": {}, "model": {}}
  if not n:
    block.update(_report_level(report))
    block["fired"] = _fired(block, robust_accuracy)
    return block
  for name in TRACED_ATTACKS:
    if name in robust_accuracy:
      fn = _compiled(evaluator, ("pgd", name), lambda name=name: _pgd_fn(
          evaluator.apply, attacks.EVAL_ATTACKS[name], evaluator.norm, evaluator.seed), 2)
      block["attacks"][name] = _attack_indicators(evaluator, fn, variables, images, labels,
                                                  np.arange(n), epsilon, big_epsilon)
  num_classes = common.num_classes_of(evaluator.apply, variables,
                                      input_pipeline.to_float(jnp.asarray(images[:1])))
  for name, version in versions.ATTACK_NAMES.items():
    if name not in robust_accuracy:
      continue
    settings = _autoattack_settings(evaluator, name)
    stage_list = versions.stages(version, num_classes, epsilon=float(epsilon),
                                 norm=evaluator.norm, **settings)
    for index, stage in enumerate(stage_list):
      # The points the stage attacked: those every earlier stage left robust.
      before = (report.flags.get(f"{name}/{stage_list[index - 1].name}") if index
                else report.flags.get("clean"))
      if stage.traced_run is None or before is None:
        continue
      key = ("apgd", version, index, num_classes, tuple(sorted(settings.items())))
      fn = _compiled(evaluator, key, lambda index=index, version=version, settings=settings: (
          _apgd_fn(evaluator.apply, version, index, num_classes, evaluator.norm, evaluator.seed,
                   settings)), 2)
      block["attacks"][f"{name}/{stage.name}"] = _attack_indicators(
          evaluator, fn, variables, images, labels, np.flatnonzero(before[:n]), epsilon,
          big_epsilon, stage.num_runs)
  for name, longer in CONTINUED_BY.items():
    if name in block["attacks"] and longer in block["attacks"]:
      if not block["attacks"][longer]["incomplete_optimisation"]:
        block["attacks"][name]["answered_by"] = longer
  block["model"] = _model_indicators(evaluator, variables, images, labels, epsilon)
  block.update(_report_level(report))
  block["fired"] = _fired(block, robust_accuracy)
  return block
