"""C-LEAD on scikit-learn's bundled 8x8 digits: the offline quickstart (a few minutes on a CPU).

  python -m clead_jax.main --config configs/digits.py --workdir runs/digits

Pixels are in [0, 1]; L-inf epsilon 0.2. The split is fixed: see clead_jax/input_pipeline.py.
"""

from clead_jax.default_config import get_base_config


def get_config():
  config = get_base_config()
  config.data.name = "digits"
  config.model.name = "small_cnn"
  config.model.width = 16
  config.attack.epsilon = 0.2
  config.attack.steps = 10
  config.attack.step_size = 0.05
  config.train.batch_size = 128
  config.train.epochs = 30
  config.train.learning_rate = 0.1
  config.train.warmup_epochs = 1
  config.train.log_every = 20
  config.train.checkpoint_every = 100
  config.eval.batch_size = 360
  return config
