"""clead_jax: C-LEAD contrastive adversarial training and robustness evaluation in JAX/Flax."""

__version__ = "0.1.0"
