"""Each training method's loss against its formula computed here from plain forward passes, and
the TRADES attack's BatchNorm consistency."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clead_jax import input_pipeline
from clead_jax import methods
from clead_jax import parallel
from clead_jax import train_state
from tests.conftest import digits_config
from tests.test_losses import info_nce_reference


@functools.lru_cache(maxsize=None)
def _setup(bn_mode="eval"):
  """A small digits CNN with BatchNorm whose running statistics differ from any batch's."""
  config = digits_config(**{"attack.bn_mode": bn_mode, "loss.lam": 0.7, "loss.clean_weight": 0.3,
                            "loss.trades_beta": 4.0, "loss.temperature": 0.2})
  dataset = input_pipeline.load_dataset(config.data)
  model = train_state.build(config, dataset)
  state = jax.device_get(train_state.init_state(model, 0, parallel.make_mesh()))
  # Running statistics far from the batch statistics: mean 0.3, variance 2.
  batch_stats = jax.tree.map(lambda a: np.full_like(a, 0.3 if a.ndim and a.shape else 0.0),
                             state.batch_stats)
  batch_stats = jax.tree_util.tree_map_with_path(
      lambda path, a: np.full_like(a, 2.0) if "var" in str(path[-1]) else a, batch_stats)
  x = jnp.asarray(input_pipeline.to_float(dataset.train_images[:16]))
  y = jnp.asarray(dataset.train_labels[:16])
  return config, model, state.params, batch_stats, x, y


def _ce(logits, y):
  logits = np.asarray(logits, np.float64)
  log_p = logits - logits.max(-1, keepdims=True)
  log_p = log_p - np.log(np.exp(log_p).sum(-1, keepdims=True))
  return float(-np.mean(log_p[np.arange(len(y)), np.asarray(y)]))


def _train_forward(model, params, batch_stats, x):
  (logits, z), _ = model.network.apply({"params": params, "batch_stats": batch_stats}, x,
                                       train=True, mutable=["batch_stats"])
  return np.asarray(logits, np.float64), np.asarray(z, np.float64)


def _kl(clean, adv):
  softmax = lambda z: np.exp(z - z.max(-1, keepdims=True)) / np.exp(
      z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)
  p, q = softmax(clean), softmax(adv)
  return float(np.mean(np.sum(p * np.log(p / q), -1)))


@pytest.mark.parametrize("method", ["standard", "pgd_at", "trades", "clead"])
def test_each_method_minimises_its_formula(method):
  """standard: CE(clean); pgd_at: CE(adv); trades: CE(clean) + beta KL(p_clean || p_adv) with a
  train-mode pass each (the reference's two passes); clead: CE(adv) + w CE(clean) + lambda
  InfoNCE over one interleaved train-mode pass. x_adv here is any other batch."""
  config, model, params, batch_stats, x, y = _setup()
  x_adv = jnp.clip(x + 0.2 * jnp.sign(jnp.sin(jnp.arange(x.size).reshape(x.shape))), 0.0, 1.0)
  ctx = methods.Context(model.network, config)
  loss, _ = methods.METHODS[method].loss(ctx, params, batch_stats, x, x_adv, y)
  clean, z_clean = _train_forward(model, params, batch_stats, x)
  adv, z_adv = _train_forward(model, params, batch_stats, x_adv)
  loss_config = config.loss
  if method == "standard":
    expected = _ce(clean, y)
  elif method == "pgd_at":
    expected = _ce(adv, y)
  elif method == "trades":
    expected = _ce(clean, y) + loss_config.trades_beta * _kl(clean, adv)
  else:
    both = jnp.stack([x, x_adv], 1).reshape((-1,) + x.shape[1:])
    logits, z = _train_forward(model, params, batch_stats, both)
    nce = info_nce_reference(z[0::2], z[1::2], np.asarray(y), loss_config.temperature,
                             loss_config.positives)
    expected = (_ce(logits[1::2], y) + loss_config.clean_weight * _ce(logits[0::2], y)
                + loss_config.lam * nce)
    assert not np.allclose(logits[0::2], clean, atol=1e-3)  # the joint pass is a different one
  np.testing.assert_allclose(float(loss), expected, rtol=2e-4)


@pytest.mark.parametrize("bn_mode", ["eval", "batch"])
def test_trades_attack_objective_is_zero_at_the_clean_point(bn_mode):
  """TRADES' attack maximises KL(p_clean || p(x')): p_clean must come from the model as the
  attack sees it (the same BatchNorm mode), so that the objective is zero at x' = x."""
  config, model, params, batch_stats, x, y = _setup(bn_mode)
  ctx = methods.Context(model.network, config)
  objective = methods.trades_objective(ctx, params, batch_stats, x)
  logits, z = ctx.attack_apply_fn()(ctx.attack_variables(params, batch_stats), x)
  assert abs(float(objective(logits, z, y))) < 1e-4
  # The two BatchNorm modes do differ here, so the check above can fail.
  eval_logits, _ = model.network.apply({"params": params, "batch_stats": batch_stats}, x,
                                       train=False)
  train_logits, _ = _train_forward(model, params, batch_stats, x)
  assert np.max(np.abs(np.asarray(eval_logits) - train_logits)) > 0.1
