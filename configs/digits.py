"""C-LEAD on scikit-learn's bundled 8x8 digits: the offline quickstart (a few minutes on a CPU).

  python -m clead_jax.main --config configs/digits.py --workdir runs/digits

Pixels are in [0, 1]; L-inf epsilon 0.2. The split is fixed: see clead_jax/input_pipeline.py.
"""

from clead_jax import recipes


def get_config():
  return recipes.digits()
