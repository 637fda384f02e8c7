"""C-LEAD on SVHN (TFDS svhn_cropped) with ResNet-18, L-inf epsilon 8/255.

  python -m clead_jax.main --config configs/svhn.py --workdir runs/svhn

SVHN is usually trained with a smaller learning rate (0.01) and without flips.
"""

from clead_jax.default_config import get_base_config


def get_config():
  config = get_base_config()
  config.data.name = "svhn_cropped"
  config.data.augment = False
  config.model.name = "resnet18"
  config.model.width = 64
  config.attack.epsilon = 8 / 255
  config.attack.steps = 10
  config.attack.step_size = 2 / 255
  config.train.batch_size = 128
  config.train.epochs = 50
  config.train.learning_rate = 0.01
  config.train.weight_decay = 5e-4
  config.train.schedule = "piecewise"
  config.train.log_every = 100
  config.train.checkpoint_every = 1000
  config.train.eval_every = 10
  config.eval.batch_size = 500
  return config
