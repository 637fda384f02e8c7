"""PGD-AT on CIFAR-10 as in Rice, Wong & Kolter 2020 (arXiv 2002.11569, their train_cifar.py).

  python -m clead_jax.main --config configs/cifar10_pgd_at.py --workdir runs/cifar10_pgd_at
  python -m clead_jax.main --config configs/cifar10_pgd_at.py:wrn34 --workdir runs/cifar10_pgd_at_wrn34

The argument after ':' picks the network: preact_resnet18 (the default, Rice et al.'s PreAct
ResNet-18), resnet18, or wrn34 (WideResNet-34-10). The recipe: 200 epochs of SGD (momentum 0.9,
batch 128, weight decay 5e-4 on every parameter), learning rate 0.1 divided by 10 at epochs 100
and 150; training examples from PGD-10 (step 2/255, uniform random start) in L-inf epsilon 8/255,
with the BatchNorm batch statistics during the attack (their model is in train mode);
random crop (pad 4) and flip. Every epoch PGD-20 on 1,000 held-out training images (the
validation split; Rice et al. used test images) picks DIR/best_checkpoint (their early stopping);
report.json evaluates the last weights, `evaluate --checkpoint=best` the chosen ones.
The same schedule with another loss: --config.method=clead | trades.
"""

from clead_jax import recipes


def get_config(network="preact_resnet18"):
  return recipes.pgd_at_rice(network)
