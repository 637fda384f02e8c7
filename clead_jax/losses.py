"""Loss functions: cross-entropy, margin (CW), TRADES KL, the vectorised InfoNCE and C-LEAD's.

Per-example losses return shape (N,); the trainers average them.
"""

import jax
import jax.numpy as jnp
import optax

POSITIVES = ("pair", "class", "instance")


def cross_entropy(logits, labels):
  """Per-example softmax cross-entropy with integer labels."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def margin(logits, labels):
  """CW margin: max_{j != y} z_j - z_y. Positive means misclassified."""
  num_classes = logits.shape[-1]
  one_hot = jax.nn.one_hot(labels, num_classes, dtype=bool)
  correct = jnp.sum(jnp.where(one_hot, logits, 0.0), axis=-1)
  best_other = jnp.max(jnp.where(one_hot, -jnp.inf, logits), axis=-1)
  return best_other - correct


def trades_kl(logits_clean, logits_adv):
  """Per-example KL(p_clean || p_adv), the TRADES robustness term (Zhang et al. 2019)."""
  log_p_clean = jax.nn.log_softmax(logits_clean)
  log_p_adv = jax.nn.log_softmax(logits_adv)
  return jnp.sum(jnp.exp(log_p_clean) * (log_p_clean - log_p_adv), axis=-1)


def info_nce_masks(labels, positives: str = "pair"):
  """Positive and denominator masks over the 2N embeddings [clean_0, adv_0, clean_1, adv_1, ...].

  Embeddings are interleaved so that a clean/adversarial pair stays on one device when the batch
  is sharded. Returns (positive, denominator), each a (2N, 2N) boolean matrix; the diagonal is
  never in either.
  """
  if positives not in POSITIVES:
    raise ValueError(f"positives={positives!r}; choose one of {POSITIVES}")
  labels2 = jnp.repeat(labels, 2)
  index = jnp.arange(labels2.shape[0])
  not_self = index[:, None] != index[None, :]
  twin = (index[:, None] // 2 == index[None, :] // 2) & not_self
  same_class = labels2[:, None] == labels2[None, :]
  if positives == "pair":
    # Same-class images are neither positives nor negatives: they leave the denominator.
    return twin, twin | ~same_class
  if positives == "instance":
    return twin, not_self
  return same_class & not_self, not_self  # "class": SupCon (Khosla et al. 2020).


def info_nce(z_clean, z_adv, labels, temperature: float = 0.1, positives: str = "pair"):
  """Vectorised InfoNCE over N clean/adversarial pairs: one (2N x 2N) similarity matrix.

  Every one of the 2N embeddings is an anchor. For anchor i with positives P(i) and denominator
  set D(i): loss_i = -mean_{p in P(i)} [s_ip - logsumexp_{k in D(i)} s_ik], s = z z^T / tau.
  Embeddings should be L2-normalised. Returns the mean over anchors (a scalar).
  """
  z = jnp.stack([z_clean, z_adv], axis=1).reshape(-1, z_clean.shape[-1])
  similarity = (z @ z.T) / temperature
  positive, denominator = info_nce_masks(labels, positives)
  log_denominator = jax.nn.logsumexp(jnp.where(denominator, similarity, -jnp.inf), axis=-1)
  log_prob = similarity - log_denominator[:, None]
  num_positives = jnp.sum(positive, axis=-1)
  per_anchor = -jnp.sum(jnp.where(positive, log_prob, 0.0), axis=-1) / jnp.maximum(num_positives, 1)
  return jnp.mean(per_anchor)


def clead(logits_clean, logits_adv, z_clean, z_adv, labels, *, lam=1.0, clean_weight=1.0,
          temperature=0.1, positives="pair"):
  """C-LEAD's training loss (a scalar): CE(adv) + clean_weight CE(clean) + lam InfoNCE(z_clean,
  z_adv), the CEs averaged over the batch; the defaults are config.loss's."""
  return (jnp.mean(cross_entropy(logits_adv, labels))
          + clean_weight * jnp.mean(cross_entropy(logits_clean, labels))
          + lam * info_nce(z_clean, z_adv, labels, temperature, positives))
