"""TRADES on CIFAR-10 as in Zhang et al. 2019 (arXiv 1901.08573, their train_trades_cifar10.py).

  python -m clead_jax.main --config configs/cifar10_trades.py --workdir runs/cifar10_trades
  python -m clead_jax.main --config configs/cifar10_trades.py:wrn34,100 --workdir runs/cifar10_trades_100
  python -m clead_jax.main --config configs/cifar10_trades.py:resnet18 --workdir runs/cifar10_trades_r18

The argument after ':' is NETWORK[,EPOCHS]: wrn34 (the default, WideResNet-34-10), resnet18 or
preact_resnet18; EPOCHS 76 (the default, as in the released script) or more. The recipe: SGD
(momentum 0.9, batch 128), learning rate 0.1 divided by 10 when the 1-based epoch reaches 75, 90
and 100 (so 76 epochs train 2 epochs at 0.01), weight decay 2e-4 for WRN-34-10 and 5e-4 for the
ResNet-18s (our choice; the TRADES script only trains WRN-34-10); beta = 6; the KL attack: 10
steps of 2/255 from x + 0.001 N(0, 1) in L-inf epsilon 8/255 (the released script uses 0.031 and
0.007, i.e. 7.9/255 and 1.8/255; 8/255 is the threat model RobustBench evaluates), with the
BatchNorm running statistics (their model is in eval mode during the attack); crop and flip.
"""

from clead_jax import recipes


def get_config(arg="wrn34"):
  return recipes.trades_zhang(arg)
