"""C-LEAD on Fashion-MNIST (TFDS fashion_mnist, 60,000 + 10,000 28x28 images), L-inf epsilon 0.1,
TRADES' SmallCNN (model mnist_cnn). The recipe and the reasons for its values:
clead_jax/recipes.py, fashion_mnist().

Offline, prepare the dataset once from the four original IDX files:

  apt-get install dataset-fashion-mnist && python -m clead_jax.prepare fashion_mnist

The full recipe (one GPU; launch/gpu_fashion_mnist.sh runs all four methods):

  python -m clead_jax.main --config configs/fashion_mnist.py --workdir runs/fashion_mnist

The CPU recipe (about 10 minutes per run on 2 cores: 10,000 training images, width 16, 8 epochs,
a 5,000-image validation split, the first 1,000 test images):

  python -m clead_jax.main --config configs/fashion_mnist.py:cpu --workdir runs/fashion_mnist_cpu
  python -m clead_jax.study --config configs/fashion_mnist.py:cpu --methods standard,pgd_at,trades,clead --seeds 1 --workdir runs/fashion_mnist_study

The full-split CPU recipe (all 55,000 training images left after a 5,000-image validation split,
width 16, 4 epochs of PGD-10, weight averaging with decay 0.995; FGSM and PGD-20 on all 10,000
test images; at most 20 minutes per robust run on the idle 2-core machine):

  python -m clead_jax.main --config configs/fashion_mnist.py:cpu_full --workdir runs/fashion_mnist_full

The GPU recipe averages its weights (train.ema_decay=0.999); --config.eval.weights=raw evaluates
the last weights instead. Weight perturbation: --config.train.awp_gamma=0.01 (AWP), off in every
recipe here because the full-split study's ablation found it cost 2.4 clean and 0.8 AutoAttack
points on the CPU recipe (RESULTS.md, 1c); single-step training: --config.attack.name=nfgsm
(N-FGSM, 4.8 AutoAttack points below PGD-10 there, one seed).

The recipe of the public Fashion-MNIST AutoAttack number (PGD-AT at L-inf epsilon 0.3, MTandHJ/
PyTorch-Robust; days on a CPU, RESULTS.md 1d has a cut of it):

  python -m clead_jax.main --config configs/fashion_mnist.py:published --workdir runs/fashion_mnist_published

Other methods: --config.method=standard | pgd_at | trades.
"""

from clead_jax import recipes


def get_config(variant="gpu"):
  return recipes.fashion_mnist(variant)
