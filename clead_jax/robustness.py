"""clead_jax as a library: AutoAttack and the other attacks on any JAX model.

The public names are `__all__`; their signatures are promised (tests/test_robustness_api.py
checks them against SIGNATURES there, so a refactor that changes one fails).

The model is a function of NHWC images in [0, 1]:
  logits_fn(x) -> logits                with params=None (nothing else is traced in), or
  logits_fn(params, x) -> logits        with params given: the weights are an argument of the
                                        compiled function, not constants baked into it.
It may also return (logits, embedding); the attacks here only use the logits (except a custom
PGD objective). It must be deterministic and in inference mode (BatchNorm with its running
statistics): an evaluation of a model in training mode is not of the model that is deployed.

evaluate() runs the same code as `python -m clead_jax.evaluate`: evaluation/suite.Evaluator and
suite.evaluate, AutoAttack through evaluation/autoattack_runner.Runner stage by stage on the points
still robust, sharded over every device, resumable from `state_dir`, with the report's checks and
indicators of attack failure. Example i's randomness comes from (seed, i), so results do not
depend on the batch size or the device count.

The attacks take (logits_fn, params, x, y, key, *, epsilon, ...) -> x_adv on a batch, are
jittable, and return points in the epsilon-ball around x and in [0, 1]. `key` is one PRNG key
or one key per example.
"""

import dataclasses
import json
import os
from typing import Callable, Optional, Sequence

import jax
import numpy as np

from clead_jax import attacks as attacks_lib
from clead_jax import losses
from clead_jax import parallel
from clead_jax import provenance
from clead_jax import report as report_lib
from clead_jax.autoattack import apgd as apgd_lib
from clead_jax.autoattack import fab as fab_lib
from clead_jax.autoattack import square as square_lib
from clead_jax.autoattack import versions
from clead_jax.evaluation import suite
from clead_jax.evaluation import workdir as workdir_lib

__all__ = [
    "evaluate", "Result", "ATTACK_NAMES", "AUTOATTACK_VERSIONS",
    "fgsm", "pgd", "pgd_linf", "pgd_l2", "cw_linf", "apgd", "fab", "square", "autoattack",
    "ce_objective", "margin_objective",
    "cross_entropy", "margin", "trades_kl", "info_nce", "clead_loss",
]

# What evaluate(attacks=...) accepts: the CLI's white-box attacks (the transfer attack needs a
# surrogate run, so it stays with the CLI).
ATTACK_NAMES = tuple(suite.WHITE_BOX_ATTACKS)
AUTOATTACK_VERSIONS = versions.VERSIONS  # autoattack(version=...): standard, plus, rand

ce_objective = attacks_lib.ce_objective  # objective(logits, embedding, labels) -> scalar
margin_objective = attacks_lib.margin_objective
cross_entropy = losses.cross_entropy  # (logits, labels) -> (N,)
margin = losses.margin  # (logits, labels) -> (N,): max_{j != y} z_j - z_y
trades_kl = losses.trades_kl  # (logits_clean, logits_adv) -> (N,)
info_nce = losses.info_nce  # (z_clean, z_adv, labels, temperature, positives) -> scalar
clead_loss = losses.clead  # (logits_clean, logits_adv, z_clean, z_adv, labels, *, ...) -> scalar


def _apply_fn(logits_fn, with_params):
  """logits_fn as the attacks inside see a model: apply(variables, x) -> (logits, embedding)."""
  def apply(variables, x):
    out = logits_fn(variables, x) if with_params else logits_fn(x)
    return tuple(out) if isinstance(out, (tuple, list)) else (out, out)
  return apply


# --- evaluation --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Result:
  """What evaluate() measured: `report` is the CLI's report.json as a dict, `flags` the CLI's
  report_examples.npz ({"clean": (n,) bool, attack: (n,) bool correct clean and after it, and
  "autoattack/<stage>": after each stage})."""
  report: dict
  flags: dict

  @property
  def clean_accuracy(self) -> float:
    return self.report["clean_accuracy"]

  @property
  def robust_accuracy(self) -> dict:
    """{attack: accuracy} of each attack (AutoAttack's stages are in stage_accuracy)."""
    return {k: v for k, v in self.report["robust_accuracy"].items() if "/" not in k}

  @property
  def stage_accuracy(self) -> dict:
    """{"autoattack/apgd_ce": accuracy after that stage, ...} of each AutoAttack version."""
    return {k: v for k, v in self.report["robust_accuracy"].items() if "/" in k}

  @property
  def worst_case_accuracy(self) -> float:
    """Correct clean and under every attack, per example."""
    return self.report.get("worst_case_accuracy")

  @property
  def worst_case(self) -> np.ndarray:
    robust = self.flags["clean"].copy()
    for name in self.robust_accuracy:
      robust &= self.flags[name]
    return robust

  @property
  def attack_time_s(self) -> dict:
    return self.report["attack_time_s"]

  @property
  def warnings(self) -> list:
    return self.report.get("warnings", [])

  @property
  def indicators(self) -> dict:
    return self.report.get("indicators", {})

  def to_json(self) -> str:
    return json.dumps(self.report, indent=2) + "\n"

  def to_markdown(self) -> str:
    return report_lib.to_markdown(self.report)


def _checked_arrays(images, labels):
  images, labels = np.asarray(images), np.asarray(labels)
  if images.ndim != 4:
    raise ValueError(f"images: shape {images.shape}; expected (N, height, width, channels)")
  if labels.shape != (len(images),):
    raise ValueError(f"labels: shape {labels.shape}; expected ({len(images)},), one per image")
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels: dtype {labels.dtype}; expected integer class indices")
  if images.dtype != np.uint8:
    if not np.issubdtype(images.dtype, np.floating):
      raise ValueError(f"images: dtype {images.dtype}; expected uint8 or floats in [0, 1]")
    images = images.astype(np.float32)
    if images.size and (images.min() < 0.0 or images.max() > 1.0):
      raise ValueError(f"images: values in [{images.min():.4g}, {images.max():.4g}]; expected "
                       "[0, 1] (normalise inside logits_fn, so that epsilon is in pixel units)")
  return images, labels.astype(np.int32)


def _attack_names(attacks):
  names = suite.parse_attack_names(attacks if isinstance(attacks, str) else ",".join(attacks),
                                   field="attacks")
  transfer = [name for name in names if name in suite.TRANSFER_ATTACKS]
  if transfer:
    raise ValueError(f"attacks: {transfer} need a surrogate training run; use python -m "
                     "clead_jax.evaluate for them")
  return names


def evaluate(logits_fn: Callable, images, labels, *, epsilon: float, norm: str = "linf",
             attacks: Sequence[str] = ("autoattack",), batch_size: int = 512, seed: int = 0,
             state_dir: Optional[str] = None, progress: bool = True, params=None,
             autoattack_settings: Optional[dict] = None, indicators: bool = True) -> Result:
  """Clean accuracy and accuracy under each attack of `attacks` (ATTACK_NAMES: "autoattack",
  "autoattack_plus", "autoattack_rand", "pgd20", "pgd100", "cw", "fgsm") at `epsilon` in `norm`
  ("linf" or "l2"), of `logits_fn` on `images` (N, H, W, C: uint8, or floats in [0, 1]) with
  integer `labels`.

  The CLI's evaluation (see the module docstring): sharded over every device in batches of
  `batch_size` (rounded up to the device count), the random starts from `seed`. With `state_dir`
  the report is written there (report.json, report.md, report_examples.npz) and AutoAttack saves
  its progress under it: a second call with the same function name, params, points, epsilon,
  norm and seed skips the attacks already measured and resumes AutoAttack where it stopped.
  `autoattack_settings` (e.g. {"n_iter": 10, "n_queries": 100}) shrink AutoAttack for a quick
  look; the report then warns that its numbers are not AutoAttack's. `indicators=False` leaves
  out the indicators of attack failure (report["indicators"]): they re-run PGD and APGD on up to
  512 points and change no accuracy.
  """
  images, labels = _checked_arrays(images, labels)
  attack_names = _attack_names(attacks)
  with_params = params is not None
  variables = params if with_params else ()
  mesh = parallel.make_mesh()
  evaluator = suite.Evaluator(None, mesh, norm, batch_size, seed,
                              apply_fn=_apply_fn(logits_fn, with_params),
                              autoattack_settings=autoattack_settings)
  model = getattr(logits_fn, "__qualname__", type(logits_fn).__name__)
  identity = {"weights_fingerprint": provenance.weights_fingerprint(variables) if with_params
              else None, "model": model,
              "data_fingerprint": provenance.weights_fingerprint({"images": images,
                                                                  "labels": labels}),
              "num_examples": int(len(labels)), "epsilon": float(epsilon), "norm": norm,
              "seed": int(seed), "autoattack_settings": dict(sorted(
                  (autoattack_settings or {}).items()))}
  header = {"method": "evaluated", "dataset": "given images", "model": model, "norm": norm,
            "epsilon": float(epsilon), "num_examples": int(len(labels))}
  is_writer = jax.process_index() == 0
  report = report_lib.Report(state_dir, header, identity, is_writer=is_writer)
  report.announce_archive()
  if state_dir:
    attack_names = [name for name in attack_names if name not in report.flags]
  state_path = None
  if state_dir:
    state_path = lambda name: os.path.join(state_dir, workdir_lib.AUTOATTACK_STATE_DIR,
                                           f"{name}.npz")
  data = suite.evaluate(evaluator, variables, images, labels, epsilon=epsilon,
                        attack_names=attack_names, progress=progress and is_writer,
                        report=report, autoattack_state=state_path,
                        autoattack_identity=identity, with_indicators=indicators)
  return Result(data, {name: flags.copy() for name, flags in report.flags.items()})


# --- the attacks ---------------------------------------------------------------------------------

def fgsm(logits_fn, params, x, y, key, *, epsilon, norm="linf", init="none",
         objective=ce_objective):
  """FGSM (Goodfellow et al. 2015): one step of size epsilon from x (init="uniform": from a
  random point of the ball; `key` is only used then)."""
  return attacks_lib.fgsm(_apply_fn(logits_fn, params is not None), params, x, y, key,
                          epsilon=epsilon, norm=norm, objective=objective, init=init)


def pgd(logits_fn, params, x, y, key, *, epsilon, step_size, steps, norm="linf", init="uniform",
        objective=ce_objective, keep_misclassified=False):
  """PGD (Madry et al. 2018) on any objective(logits, embedding, labels) -> scalar (summed over
  the batch; embedding is the model's second output, or its logits). keep_misclassified: each
  example keeps the first iterate the model misclassified (evaluation)."""
  return attacks_lib.pgd(_apply_fn(logits_fn, params is not None), params, x, y, key,
                         epsilon=epsilon, step_size=step_size, steps=steps, norm=norm, init=init,
                         objective=objective, keep_misclassified=keep_misclassified)


def pgd_linf(logits_fn, params, x, y, key, *, epsilon, steps=20, step_size=None):
  """The evaluation's PGD in L-inf: uniform start, step epsilon/4 (default), cross-entropy, the
  first misclassified iterate kept (steps=20: the report's pgd20; 100: pgd100)."""
  return pgd(logits_fn, params, x, y, key, epsilon=epsilon, steps=steps, norm="linf",
             step_size=epsilon / 4 if step_size is None else step_size, keep_misclassified=True)


def pgd_l2(logits_fn, params, x, y, key, *, epsilon, steps=20, step_size=None):
  """As pgd_linf, in L2 (normalised-gradient steps of epsilon/4 by default)."""
  return pgd(logits_fn, params, x, y, key, epsilon=epsilon, steps=steps, norm="l2",
             step_size=epsilon / 4 if step_size is None else step_size, keep_misclassified=True)


def cw_linf(logits_fn, params, x, y, key, *, epsilon, steps=100, step_size=None):
  """CW-L-inf (the report's cw): PGD on the margin loss, step epsilon/10 by default."""
  return pgd(logits_fn, params, x, y, key, epsilon=epsilon, steps=steps, norm="linf",
             step_size=epsilon / 10 if step_size is None else step_size,
             objective=margin_objective, keep_misclassified=True)


def apgd(logits_fn, params, x, y, key, *, epsilon, norm="linf", loss="ce", targeted=False,
         n_iter=apgd_lib.N_ITER, n_restarts=1, n_target_classes=apgd_lib.N_TARGET_CLASSES):
  """APGD (Croce & Hein 2020): loss "ce" or "dlr"; targeted=True is APGD-T (DLR, over the
  n_target_classes most likely wrong classes). Each example keeps the first run that fools it."""
  return apgd_lib.apgd(_apply_fn(logits_fn, params is not None), params, x, y, key,
                       epsilon=epsilon, norm=norm, loss=loss, targeted=targeted, n_iter=n_iter,
                       n_restarts=n_restarts, n_target_classes=n_target_classes)


def fab(logits_fn, params, x, y, key, *, epsilon, norm="linf", targeted=False, n_restarts=1,
        n_target_classes=fab_lib.N_TARGET_CLASSES, n_iter=fab_lib.N_ITER):
  """FAB (Croce & Hein 2020), minimum-norm, its point returned when inside the epsilon-ball;
  targeted=True is FAB-T."""
  return fab_lib.fab(_apply_fn(logits_fn, params is not None), params, x, y, key,
                     epsilon=epsilon, norm=norm, targeted=targeted, n_restarts=n_restarts,
                     n_target_classes=n_target_classes, n_iter=n_iter)


def square(logits_fn, params, x, y, key, *, epsilon, norm="linf",
           n_queries=square_lib.N_QUERIES):
  """Square (Andriushchenko et al. 2020): black-box, random square updates, margin loss."""
  return square_lib.square(_apply_fn(logits_fn, params is not None), params, x, y, key,
                           epsilon=epsilon, norm=norm, n_queries=n_queries)


def autoattack(logits_fn, params, x, y, key, *, epsilon, norm="linf", version="standard",
               n_iter=apgd_lib.N_ITER, fab_iter=fab_lib.N_ITER, n_queries=square_lib.N_QUERIES,
               n_target_classes=apgd_lib.N_TARGET_CLASSES):
  """AutoAttack `version` (AUTOATTACK_VERSIONS) on one batch, jittable: every stage runs on the
  whole batch and each example keeps the first point that fooled it. The keyword defaults are
  the reference's. For a whole split, sharded and on the robust points only, use evaluate()."""
  return versions.autoattack(_apply_fn(logits_fn, params is not None), params, x, y, key,
                             epsilon=epsilon, norm=norm, version=version, n_iter=n_iter,
                             fab_iter=fab_iter, n_queries=n_queries,
                             n_target_classes=n_target_classes)
