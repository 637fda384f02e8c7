"""clead_jax: C-LEAD contrastive adversarial training and robustness evaluation in JAX/Flax.

As a library: `from clead_jax import robustness`, then robustness.evaluate(...), the attacks and
the losses (its `__all__`). Those names are available here too, loaded on first use so that the
commands start without importing JAX, except `evaluate` and `autoattack`: clead_jax.evaluate is
the evaluate command's module and clead_jax.autoattack the AutoAttack package.
"""

import importlib

__version__ = "0.1.0"

# clead_jax.robustness.__all__ less the names of submodules, spelt out so that `from clead_jax
# import <submodule>` does not load it (tests/test_robustness_api.py checks the two lists).
PUBLIC_NAMES = (
    "Result", "ATTACK_NAMES", "AUTOATTACK_VERSIONS",
    "fgsm", "pgd", "pgd_linf", "pgd_l2", "cw_linf", "apgd", "fab", "square",
    "ce_objective", "margin_objective",
    "cross_entropy", "margin", "trades_kl", "info_nce", "clead_loss",
)


def __getattr__(name):
  if name in PUBLIC_NAMES:
    return getattr(importlib.import_module("clead_jax.robustness"), name)
  raise AttributeError(f"module 'clead_jax' has no attribute {name!r}")
