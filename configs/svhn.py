"""C-LEAD on SVHN (TFDS svhn_cropped) with ResNet-18, L-inf epsilon 8/255.

  python -m clead_jax.main --config configs/svhn.py --workdir runs/svhn

configs/cifar10.py's recipe, except as SVHN is usually trained: a smaller learning rate (0.01),
no flips or crops, and 50 epochs.
"""

from clead_jax import recipes


def get_config():
  config = recipes.cifar10()
  config.data.name = "svhn_cropped"
  config.data.augment = False
  config.train.epochs = 50
  config.train.learning_rate = 0.01
  return config
