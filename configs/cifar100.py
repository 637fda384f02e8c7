"""C-LEAD on CIFAR-100 with ResNet-18, L-inf epsilon 8/255: configs/cifar10.py on 100 classes.

  python -m clead_jax.main --config configs/cifar100.py --workdir runs/cifar100
"""

from clead_jax import recipes


def get_config():
  config = recipes.cifar10()
  config.data.name = "cifar100"
  return config
