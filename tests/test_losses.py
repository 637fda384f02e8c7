"""InfoNCE against a slow loop reference, and the other losses' defining properties."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clead_jax import losses


def _normalise(z):
  return z / np.linalg.norm(z, axis=-1, keepdims=True)


def info_nce_reference(z_clean, z_adv, labels, temperature, positives):
  """Anchor by anchor, pair by pair, in float64 numpy."""
  n = len(labels)
  z = np.empty((2 * n, z_clean.shape[1]))
  z[0::2], z[1::2] = z_clean, z_adv
  owner = np.repeat(np.arange(n), 2)
  label = np.repeat(labels, 2)
  total = 0.0
  for i in range(2 * n):
    pos, den = [], []
    for k in range(2 * n):
      if k == i:
        continue
      twin = owner[k] == owner[i]
      same = label[k] == label[i]
      if positives == "pair":
        is_pos, in_den = twin, twin or not same
      elif positives == "instance":
        is_pos, in_den = twin, True
      else:
        is_pos, in_den = same, True
      s = float(z[i] @ z[k]) / temperature
      if is_pos:
        pos.append(s)
      if in_den:
        den.append(s)
    log_den = np.log(np.sum(np.exp(den)))
    total += -np.mean([p - log_den for p in pos])
  return total / (2 * n)


@pytest.mark.parametrize("positives,temperature", list(itertools.product(
    ["pair", "class", "instance"], [0.1, 0.5])))
def test_info_nce_matches_loop_reference(positives, temperature):
  rng = np.random.default_rng(0)
  n, d = 12, 6
  z_clean = _normalise(rng.normal(size=(n, d)))
  z_adv = _normalise(rng.normal(size=(n, d)))
  labels = rng.integers(0, 4, size=n)
  got = losses.info_nce(jnp.asarray(z_clean, jnp.float32), jnp.asarray(z_adv, jnp.float32),
                        jnp.asarray(labels), temperature, positives)
  want = info_nce_reference(z_clean, z_adv, labels, temperature, positives)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


@pytest.mark.parametrize("positives", ["pair", "class", "instance"])
def test_pulling_a_pair_together_lowers_info_nce(positives):
  rng = np.random.default_rng(1)
  n, d = 8, 5
  z_clean = _normalise(rng.normal(size=(n, d)))
  z_adv = _normalise(rng.normal(size=(n, d)))
  labels = np.arange(n) % 4
  before = losses.info_nce(z_clean, z_adv, labels, 0.1, positives)
  moved = z_adv.copy()
  moved[3] = _normalise(0.2 * z_adv[3] + 0.8 * z_clean[3])  # adversarial twin of 3 moves closer
  after = losses.info_nce(z_clean, moved, labels, 0.1, positives)
  assert float(after) < float(before)


def test_info_nce_gradient_is_finite_with_masked_entries():
  rng = np.random.default_rng(2)
  z = _normalise(rng.normal(size=(6, 4))).astype(np.float32)
  labels = np.zeros(6, np.int32)  # one class: every other image leaves the denominator
  grad = jax.grad(lambda a: losses.info_nce(a, jnp.asarray(z), labels))(jnp.asarray(z[::-1]))
  assert np.all(np.isfinite(grad))


def _softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_trades_kl_is_kl_of_clean_to_adversarial():
  """KL(p_clean || p_adv) = sum p_clean log(p_clean / p_adv), in float64; on these logits the
  reverse direction differs by far more than the tolerance, so a swapped argument fails."""
  rng = np.random.default_rng(3)
  clean, adv = rng.normal(size=(5, 10)) * 3.0, rng.normal(size=(5, 10))
  p, q = _softmax(clean), _softmax(adv)
  forward, reverse = np.sum(p * np.log(p / q), -1), np.sum(q * np.log(q / p), -1)
  assert np.min(np.abs(forward - reverse)) > 0.1  # the test can tell the directions apart
  got = losses.trades_kl(jnp.asarray(clean, jnp.float32), jnp.asarray(adv, jnp.float32))
  np.testing.assert_allclose(got, forward, rtol=1e-4)
  logits = jnp.asarray(clean, jnp.float32)
  np.testing.assert_allclose(losses.trades_kl(logits, logits), 0.0, atol=1e-6)


def test_margin_sign_says_whether_misclassified():
  logits = jnp.asarray([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
  labels = jnp.asarray([0, 0])
  np.testing.assert_allclose(losses.margin(logits, labels), [-2.0, 2.0])
