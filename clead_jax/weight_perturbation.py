"""Adversarial weight perturbation (AWP; Wu, Xia & Wang 2020, "Adversarial Weight Perturbation
Helps Robust Generalization"), as pure functions on parameter trees.

After the adversarial examples are made, the weights are pushed uphill on the method's own loss:
each layer's kernel (a parameter with more than one axis, as the reference code perturbs only
those) moves along its gradient of that loss, scaled so that the move has norm gamma * ||w|| of
that layer. The training gradient is then taken at the perturbed weights and the optimizer
applies it at the unperturbed ones: the perturbation is removed before the update.

A leaf module: it imports nothing of clead_jax; train.py composes it with the methods' losses.
"""

import jax
import jax.numpy as jnp

_TINY = 1e-20  # as the reference: a zero gradient gives a zero perturbation, not a NaN


def is_perturbed(leaf) -> bool:
  """Kernels are perturbed; biases and BatchNorm scales (one axis or none) are not."""
  return leaf.ndim > 1


def layerwise_perturbation(params, grads, gamma):
  """v with v_l = gamma * ||w_l|| * g_l / ||g_l|| for each kernel l, and 0 elsewhere."""

  def one(w, g):
    if not is_perturbed(w):
      return jnp.zeros_like(w)
    return gamma * jnp.linalg.norm(w) * g / (jnp.linalg.norm(g) + _TINY)

  return jax.tree.map(one, params, grads)


def perturbation(loss_fn, params, gamma):
  """The AWP perturbation of `params` for `loss_fn(params) -> (loss, aux)`: one ascent direction
  (the gradient at params), normalised layer by layer to gamma * ||w||."""
  grads = jax.grad(lambda p: loss_fn(p)[0])(params)
  return layerwise_perturbation(params, grads, gamma)


def add(params, delta, coefficient=1.0):
  return jax.tree.map(lambda w, v: w + coefficient * v, params, delta)
