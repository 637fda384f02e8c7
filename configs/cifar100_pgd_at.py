"""PGD-AT on CIFAR-100 as in Rice, Wong & Kolter 2020: configs/cifar10_pgd_at.py on 100 classes.

  python -m clead_jax.main --config configs/cifar100_pgd_at.py --workdir runs/cifar100_pgd_at
  python -m clead_jax.main --config configs/cifar100_pgd_at.py:wrn34 --workdir runs/cifar100_pgd_at_wrn34

Networks after ':' as in configs/cifar10_pgd_at.py (default preact_resnet18). The same schedule
with another loss: --config.method=clead | trades.
"""

from clead_jax import recipes


def get_config(network="preact_resnet18"):
  config = recipes.pgd_at_rice(network)
  config.data.name = "cifar100"
  return config
