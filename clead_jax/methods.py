"""Training methods: how each makes its adversarial examples and what loss it minimises.

A method is a pair (make_adversarial, loss). The registry METHODS maps config.method to it;
adding a method means adding one entry. All functions are pure and run under jit.

C-LEAD interleaves clean and adversarial images [x_0, x_adv_0, x_1, x_adv_1, ...] before a
joint forward pass, so a pair stays on one device when the batch is sharded along 'data'. TRADES
makes two separate train-mode passes, each with its own BatchNorm batch statistics, as its
reference code does (loss.trades_joint_pass=True: one joint pass instead).
"""

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from clead_jax import attacks
from clead_jax import losses


@dataclasses.dataclass(frozen=True)
class Context:
  """What the method functions need besides arrays: the network and the config."""
  network: object
  config: object

  def forward(self, params, batch_stats, x, train=True):
    """Forward pass; in train mode BatchNorm uses and updates batch statistics."""
    variables = {"params": params, "batch_stats": batch_stats}
    if train:
      (logits, z), updates = self.network.apply(variables, x, train=True, mutable=["batch_stats"])
      return logits, z, updates["batch_stats"]
    logits, z = self.network.apply(variables, x, train=False)
    return logits, z, batch_stats

  def attack_apply_fn(self):
    """The model as the attack sees it; BatchNorm mode is an explicit config choice."""
    if self.config.attack.bn_mode == "batch":
      # Batch statistics of the attacked batch; the running averages are not updated.
      return lambda v, x: self.network.apply(v, x, train=True, mutable=["batch_stats"])[0]
    return lambda v, x: self.network.apply(v, x, train=False)

  def attack_variables(self, params, batch_stats):
    return jax.lax.stop_gradient({"params": params, "batch_stats": batch_stats})

  def attack(self, params, batch_stats, x, y, key, objective, init=None):
    """The training attack (config.attack.name) on `objective`. The start is a uniform point of
    the ball when config.attack.random_start, else x, unless the method asks for its own."""
    cfg = self.config.attack
    if init is None:
      init = "uniform" if cfg.random_start else "none"
    return attacks.TRAIN_ATTACKS[cfg.name](
        self.attack_apply_fn(), self.attack_variables(params, batch_stats), x, y, key,
        attack_config=cfg, init=init, objective=objective)


def _interleave(a, b):
  return jnp.stack([a, b], axis=1).reshape((-1,) + a.shape[1:])


def _split(ab):
  return ab[0::2], ab[1::2]


def _accuracy(logits, labels):
  return jnp.mean(jnp.argmax(logits, -1) == labels)


# --- standard: cross-entropy on clean images -----------------------------------------------------

def standard_loss(ctx, params, batch_stats, x, x_adv, y):
  del x_adv
  logits, _, batch_stats = ctx.forward(params, batch_stats, x)
  ce = jnp.mean(losses.cross_entropy(logits, y))
  return ce, (batch_stats, {"ce_clean": ce, "clean_accuracy": _accuracy(logits, y)})


# --- pgd_at: cross-entropy on PGD examples (Madry et al. 2018) -----------------------------------

def pgd_at_adversarial(ctx, params, batch_stats, x, y, key):
  return ctx.attack(params, batch_stats, x, y, key, attacks.ce_objective)


def pgd_at_loss(ctx, params, batch_stats, x, x_adv, y):
  logits_adv, _, new_stats = ctx.forward(params, batch_stats, x_adv)
  # Clean accuracy is only reported: batch statistics, no update, no gradient.
  logits_clean = jax.lax.stop_gradient(ctx.network.apply(
      {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"])[0][0])
  ce = jnp.mean(losses.cross_entropy(logits_adv, y))
  return ce, (new_stats, {"ce_adv": ce, "adv_accuracy": _accuracy(logits_adv, y),
                          "clean_accuracy": _accuracy(logits_clean, y)})


# --- trades: CE(clean) + beta KL(p_clean || p_adv) (Zhang et al. 2019) ---------------------------

def trades_objective(ctx, params, batch_stats, x):
  """The TRADES attack's objective: sum_i KL(p_clean_i || p_i) of the attacked points, with
  p_clean from the model as the attack sees it (the same BatchNorm mode), so it is zero at x."""
  logits_clean, _ = ctx.attack_apply_fn()(ctx.attack_variables(params, batch_stats), x)

  def objective(logits, embedding, labels):
    del embedding, labels
    return jnp.sum(losses.trades_kl(logits_clean, logits))

  return objective


def trades_adversarial(ctx, params, batch_stats, x, y, key):
  # TRADES starts from x + 0.001 N(0, 1) (its reference code), or x without random_start.
  return ctx.attack(params, batch_stats, x, y, key, trades_objective(ctx, params, batch_stats, x),
                    init="normal" if ctx.config.attack.random_start else "none")


def trades_loss(ctx, params, batch_stats, x, x_adv, y):
  if ctx.config.loss.get("trades_joint_pass", False):
    logits, _, batch_stats = ctx.forward(params, batch_stats, _interleave(x, x_adv))
    logits_clean, logits_adv = _split(logits)
  else:
    # As the reference (trades.py): the clean and the adversarial batch each pass through the
    # train-mode model with its own batch statistics; the running averages see both.
    logits_clean, _, batch_stats = ctx.forward(params, batch_stats, x)
    logits_adv, _, batch_stats = ctx.forward(params, batch_stats, x_adv)
  ce = jnp.mean(losses.cross_entropy(logits_clean, y))
  kl = jnp.mean(losses.trades_kl(logits_clean, logits_adv))
  loss = ce + ctx.config.loss.trades_beta * kl
  return loss, (batch_stats, {"ce_clean": ce, "kl": kl, "clean_accuracy": _accuracy(logits_clean, y),
                              "adv_accuracy": _accuracy(logits_adv, y)})


# --- clead: CE(adv) + w_clean CE(clean) + lambda InfoNCE(z_clean, z_adv) --------------------------

def clead_adversarial(ctx, params, batch_stats, x, y, key):
  cfg = ctx.config
  if cfg.attack.objective == "ce":
    return ctx.attack(params, batch_stats, x, y, key, attacks.ce_objective)
  _, z_clean = ctx.attack_apply_fn()(ctx.attack_variables(params, batch_stats), x)
  ce_weight = 1.0 if cfg.attack.objective == "both" else 0.0
  contrastive_weight = cfg.loss.lam if cfg.attack.objective == "both" else 1.0

  def objective(logits, z_adv, labels):
    # InfoNCE is a mean over anchors; times N it weighs like the summed per-example CE.
    nce = losses.info_nce(z_clean, z_adv, labels, cfg.loss.temperature, cfg.loss.positives)
    return (ce_weight * jnp.sum(losses.cross_entropy(logits, labels))
            + contrastive_weight * labels.shape[0] * nce)

  return ctx.attack(params, batch_stats, x, y, key, objective)


def clead_loss(ctx, params, batch_stats, x, x_adv, y):
  cfg = ctx.config.loss
  logits, z, batch_stats = ctx.forward(params, batch_stats, _interleave(x, x_adv))
  logits_clean, logits_adv = _split(logits)
  z_clean, z_adv = _split(z)
  ce_adv = jnp.mean(losses.cross_entropy(logits_adv, y))
  ce_clean = jnp.mean(losses.cross_entropy(logits_clean, y))
  nce = losses.info_nce(z_clean, z_adv, y, cfg.temperature, cfg.positives)
  loss = ce_adv + cfg.clean_weight * ce_clean + cfg.lam * nce
  return loss, (batch_stats, {"ce_adv": ce_adv, "ce_clean": ce_clean, "info_nce": nce,
                              "clean_accuracy": _accuracy(logits_clean, y),
                              "adv_accuracy": _accuracy(logits_adv, y)})


@dataclasses.dataclass(frozen=True)
class Method:
  make_adversarial: Optional[Callable]  # (ctx, params, batch_stats, x, y, key) -> x_adv
  loss: Callable  # (ctx, params, batch_stats, x, x_adv, y) -> (loss, (batch_stats, metrics))


METHODS = {
    "standard": Method(None, standard_loss),
    "pgd_at": Method(pgd_at_adversarial, pgd_at_loss),
    "trades": Method(trades_adversarial, trades_loss),
    "clead": Method(clead_adversarial, clead_loss),
}
