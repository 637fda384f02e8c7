"""Indicators of attack failure: each fires on a model broken the way it detects, and none on a
trained model. The broken models are the session's trained digits network with something put in
front of it or after it: a staircase (input quantisation), random noise, a constant output, a
softmax, logits scaled until the softmax saturates.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clead_jax import attacks
from clead_jax import input_pipeline
from clead_jax import parallel
from clead_jax import report as report_lib
from clead_jax import train_state
from clead_jax.evaluation import autoattack_runner
from clead_jax.evaluation import indicators
from clead_jax.evaluation import suite
from clead_jax.evaluation import workdir as workdir_lib

NUM_EXAMPLES = 100
SEED = 0
# AutoAttack with fewer iterations and queries than the reference's (the tests' CPU budget); the
# indicators read the same settings from the evaluation's Runner.
AUTOATTACK_SETTINGS = dict(n_iter=25, fab_iter=25, n_queries=300)


class Broken:
  """The trained network with `before` applied to its input and `after` to its logits."""

  def __init__(self, network, before=None, after=None):
    self.network, self.before, self.after = network, before, after

  def apply(self, variables, x, train=False):
    logits, embedding = self.network.apply(variables, self.before(x) if self.before else x,
                                           train=train)
    return (self.after(logits) if self.after else logits), embedding


def staircase(x, levels=16):
  """Input quantisation to the digits' own 16 grey levels: the clean images do not change, and
  its gradient is zero almost everywhere."""
  return jnp.round(x * levels) / levels


_NOISE = np.random.default_rng(0)


def noisy(logits, scale=2.0):
  """Fresh host-side noise on every call (io_callback: never merged or hoisted by XLA); the noise
  does not depend on the input, so gradients pass through."""
  noise = jax.experimental.io_callback(
      lambda: _NOISE.normal(0.0, scale, logits.shape).astype(np.float32),
      jax.ShapeDtypeStruct(logits.shape, jnp.float32), ordered=False)
  return logits + noise


@pytest.fixture(scope="module")
def digits(trained_digits):
  """(network, variables, images, labels, epsilon) of the session's trained digits model."""
  config, workdir, _ = trained_digits
  dataset = input_pipeline.load_dataset(config.data)
  model = train_state.build(config, dataset)
  state, _, _ = workdir_lib.restore_checkpoint(workdir, config, model, parallel.make_mesh())
  return (model.network, state.variables, dataset.test_images[:NUM_EXAMPLES],
          dataset.test_labels[:NUM_EXAMPLES], float(config.attack.epsilon))


def evaluate(network, digits, attack_names, surrogate=None, autoattack=False):
  """suite.evaluate of `network` with the trained variables; returns the report dict."""
  _, variables, images, labels, epsilon = digits
  evaluator = suite.Evaluator(network, parallel.make_mesh(), "linf", 128, seed=SEED)
  if autoattack:
    evaluator._compiled["autoattack", "autoattack"] = autoattack_runner.Runner(  # pylint: disable=protected-access
        evaluator.apply, evaluator.mesh, "linf", evaluator.batch_size, SEED, "autoattack",
        **AUTOATTACK_SETTINGS)
  return suite.evaluate(evaluator, variables, images, labels, epsilon=epsilon,
                        attack_names=attack_names, surrogate=surrogate)


def fired(report, attack=None):
  """{indicator: count or True} of those that fired (for `attack`, or model-level if None)."""
  return {f["indicator"]: f.get("count", True) for f in report["indicators"]["fired"]
          if f["attack"] == attack}


# --- the rule of incomplete optimisation, against a loop transcribed from the paper's ------------

def reference_still_improving(losses, last=10, min_gain=0.05):
  """Pintor et al.'s rule for one example, one step at a time: the attack's loss (here
  maximised, so negated to the paper's minimised form) rescaled to [0, 1], made monotone, and
  the spread of its last `last` values compared with min_gain."""
  loss = -np.asarray(losses, np.float64)
  if loss.max() != loss.min():
    loss = (loss - loss.min()) / (loss.max() - loss.min())
  else:
    loss = loss - loss.min()
  running = loss.copy()
  for i in range(1, len(running)):
    running[i] = min(running[i], running[i - 1])
  tail = running[-min(len(running), last):]
  return tail.max() - tail.min() > min_gain


def test_still_improving_follows_the_papers_rule():
  rng = np.random.default_rng(0)
  steps = 21
  # Random walks whose steps shrink at random rates: some settle early, some keep moving.
  decay = np.linspace(1, 0, steps)[:, None] ** rng.uniform(0, 4, 400)
  walks = np.cumsum(rng.normal(0, 1, (steps, 400)) * decay + rng.uniform(0, 0.3, 400) * decay, 0)
  walks[:, :5] = 1.0  # constant losses: never improving
  walks[:, 5:10] = np.arange(steps)[:, None]  # rising to the end: improving
  expected = np.array([reference_still_improving(walks[:, i]) for i in range(walks.shape[1])])
  got = np.asarray(indicators.still_improving(jnp.asarray(walks, jnp.float32)))
  assert 0.1 < expected.mean() < 0.9  # both outcomes occur
  assert not expected[:5].any() and expected[5:10].all()
  np.testing.assert_array_equal(got, expected)


# --- a trained model trips nothing -----------------------------------------------------------------

def test_no_indicator_fires_on_a_trained_model(digits):
  network = digits[0]
  report = evaluate(network, digits, ["fgsm", "pgd20", "pgd100"])
  block = report["indicators"]
  assert set(block["attacks"]) == {"pgd20", "pgd100"} and block["points"] == NUM_EXAMPLES
  assert block["fired"] == [], block["fired"]
  for counts in block["attacks"].values():
    assert counts["unconstrained_attack_failure"] == 0 and counts["unavailable_gradients"] == 0
  assert "Indicators of attack failure: none fired" in report_lib.to_markdown(
      {**report, "method": "standard", "dataset": "digits", "model": "small_cnn", "norm": "linf",
       "epsilon": digits[4], "steps": 1})


# --- broken models ---------------------------------------------------------------------------------

def test_staircase_input_has_unavailable_gradients_and_the_transfer_attack_beats_pgd(digits):
  """Quantised input: no gradient reaches it, so PGD stays at its random start; points made on
  the intact network (the transfer attack's surrogate) fool it where PGD did not."""
  network, variables = digits[:2]
  intact = evaluate(network, digits, ["pgd20"])
  surrogate = suite.Surrogate(lambda v, x: network.apply(v, x, train=False), variables, "intact")
  report = evaluate(Broken(network, before=staircase), digits, ["pgd20", "transfer_pgd3"],
                    surrogate=surrogate)
  assert report["clean_accuracy"] == intact["clean_accuracy"]  # the clean images are on the grid
  counts = report["indicators"]["attacks"]["pgd20"]
  assert counts["zero_gradients"] == counts["points"] > 0
  assert fired(report, "pgd20")["unavailable_gradients"] == counts["points"]
  assert fired(report, "transfer_pgd3")["transfer_failure"] > 0
  assert report["robust_accuracy"]["pgd20"] > intact["robust_accuracy"]["pgd20"] + 0.2
  markdown = report_lib.to_markdown({**report, "method": "standard", "dataset": "digits",
                                     "model": "small_cnn", "norm": "linf", "epsilon": digits[4],
                                     "steps": 1})
  assert "unavailable gradients (pgd20" in markdown and "transfer failure (transfer_pgd3" in markdown


def test_randomised_model_has_randomised_outputs_and_unstable_predictions(digits):
  report = evaluate(Broken(digits[0], after=noisy), digits, ["pgd20"])
  model = fired(report)
  assert model.get("randomised_outputs") and model.get("unstable_predictions"), model
  assert report["indicators"]["model"]["randomised_outputs"]["predictions_changed"] > 0


def test_too_few_steps_is_incomplete_optimisation(digits, monkeypatch):
  """PGD with 3 steps of epsilon/40 cannot reach the ball's edge: its loss still rises."""
  monkeypatch.setitem(attacks.EVAL_ATTACKS, "pgd20", attacks._strong_pgd(3, 40))  # pylint: disable=protected-access
  report = evaluate(digits[0], digits, ["pgd20"])
  assert fired(report, "pgd20").get("incomplete_optimisation", 0) > 0


def test_constant_model_is_an_unconstrained_attack_failure(digits):
  """A model that always predicts class 3: no attack at any epsilon fools the 3s."""
  constant = jnp.eye(10, dtype=jnp.float32)[3] * 5.0
  report = evaluate(Broken(digits[0], after=lambda z: 0.0 * z + constant), digits, ["pgd20"])
  threes = int(np.sum(digits[3] == 3))
  counts = report["indicators"]["attacks"]["pgd20"]
  assert counts["points"] == threes > 0
  assert fired(report, "pgd20")["unconstrained_attack_failure"] == threes
  assert counts["unavailable_gradients"] == threes  # and its gradient is zero


def test_softmax_output_is_flagged(digits):
  report = evaluate(Broken(digits[0], after=jax.nn.softmax), digits, ["pgd20"])
  assert fired(report).get("softmax_outputs")
  assert not evaluate(digits[0], digits, [])["indicators"]["model"]["softmax_outputs"]["fires"]


def test_silent_success_of_an_attack_that_returns_its_last_iterate(digits, monkeypatch):
  """PGD that keeps its last iterate instead of the first misclassified one, with steps so large
  that iterates bounce across the boundary: some points were fooled on the way and not at the
  end."""
  def bouncing(apply_fn, variables, x, y, key, *, epsilon, norm, trace=False):
    return attacks.pgd(apply_fn, variables, x, y, key, epsilon=epsilon, step_size=2 * epsilon,
                       steps=6, norm=norm, init="uniform", trace=trace)
  monkeypatch.setitem(attacks.EVAL_ATTACKS, "pgd20", bouncing)
  report = evaluate(digits[0], digits, ["pgd20"])
  assert fired(report, "pgd20").get("silent_success", 0) > 0


def test_autoattack_sees_through_saturated_logits(digits):
  """Logits times 1e4: the softmax saturates and the cross-entropy's gradient is exactly zero,
  so PGD stays at its random start; AutoAttack's DLR loss is scale-invariant, so its accuracy
  stays within one example of the intact model's, and the report says why."""
  network = digits[0]
  intact = evaluate(network, digits, ["pgd20", "autoattack"], autoattack=True)
  report = evaluate(Broken(network, after=lambda z: 1e4 * z), digits, ["pgd20", "autoattack"],
                    autoattack=True)
  n = NUM_EXAMPLES
  assert abs(report["robust_accuracy"]["autoattack"] - intact["robust_accuracy"]["autoattack"]) \
      <= 1.0 / n + 1e-9
  assert report["robust_accuracy"]["pgd20"] > intact["robust_accuracy"]["pgd20"] + 0.2
  assert fired(report, "pgd20").get("unavailable_gradients")
  assert fired(report, "autoattack/apgd_ce").get("unavailable_gradients")  # CE saturates too
  assert report["indicators"]["attacks"]["autoattack/apgd_t"]["unavailable_gradients"] == 0
  why = [f["message"] for f in report["indicators"]["fired"] if f["indicator"] == "why"]
  assert len(why) == 1 and "autoattack's apgd_t did not" in why[0], why
  for counts in intact["indicators"]["attacks"].values():
    assert counts["unavailable_gradients"] == 0
