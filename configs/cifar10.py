"""C-LEAD on CIFAR-10 with ResNet-18, L-inf epsilon 8/255, PGD-10 (step 2/255) during training.

  python -m clead_jax.main --config configs/cifar10.py --workdir runs/cifar10

Other methods: --config.method=pgd_at | trades | standard. WRN-34-10:
--config.model.name=wide_resnet --config.model.depth=34 --config.model.widen=10.
"""

from clead_jax import recipes


def get_config():
  return recipes.cifar10()
