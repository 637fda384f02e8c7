"""C-LEAD on CIFAR-10 with WideResNet-34-10: configs/cifar10.py with the larger network.

  python -m clead_jax.main --config configs/cifar10_wrn34.py --workdir runs/cifar10_wrn34

Everything else as configs/cifar10.py (100 epochs, lr 0.1 divided by 10 at epochs 50 and 75,
weight decay 5e-4, PGD-10 of 2/255 in L-inf 8/255, lambda = 1, tau = 0.1). Under exactly the
PGD-AT recipe instead: --config configs/cifar10_pgd_at.py:wrn34 --config.method=clead.
"""

from clead_jax import recipes


def get_config():
  config = recipes.cifar10()
  recipes.set_network(config, "wrn34")
  return config
