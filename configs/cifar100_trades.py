"""TRADES on CIFAR-100: configs/cifar10_trades.py (Zhang et al. 2019's recipe) on 100 classes.

  python -m clead_jax.main --config configs/cifar100_trades.py --workdir runs/cifar100_trades
  python -m clead_jax.main --config configs/cifar100_trades.py:resnet18 --workdir runs/cifar100_trades_r18

Arguments after ':' as in configs/cifar10_trades.py (default wrn34, 76 epochs). Zhang et al.
publish no CIFAR-100 numbers; RESULTS.md names the published ones this can be compared with.
"""

from clead_jax import recipes


def get_config(arg="wrn34"):
  config = recipes.trades_zhang(arg)
  config.data.name = "cifar100"
  return config
