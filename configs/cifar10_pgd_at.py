"""PGD-AT on CIFAR-10 as in Rice, Wong & Kolter 2020 (arXiv 2002.11569, their train_cifar.py).

  python -m clead_jax.main --config configs/cifar10_pgd_at.py --workdir runs/cifar10_pgd_at
  python -m clead_jax.main --config configs/cifar10_pgd_at.py:wrn34 --workdir runs/cifar10_pgd_at_wrn34

The argument after ':' picks the network: preact_resnet18 (the default, Rice et al.'s PreAct
ResNet-18), resnet18, or wrn34 (WideResNet-34-10). The recipe: 200 epochs of SGD (momentum 0.9,
batch 128, weight decay 5e-4 on every parameter), learning rate 0.1 divided by 10 at epochs 100
and 150; training examples from PGD-10 (step 2/255, uniform random start) in L-inf epsilon 8/255,
with the BatchNorm batch statistics during the attack (their model is in train mode);
random crop (pad 4) and flip. Every epoch PGD-20 on the first 1,000 test images picks
DIR/best_checkpoint (Rice et al.'s early stopping); report.json evaluates the last weights.
The same schedule with another loss: --config.method=clead | trades.
"""

from clead_jax.default_config import get_base_config

NETWORKS = {
    "preact_resnet18": {"name": "preact_resnet18", "width": 64},
    "resnet18": {"name": "resnet18", "width": 64},
    "wrn34": {"name": "wide_resnet", "depth": 34, "widen": 10},
}


def set_network(config, network):
  if network not in NETWORKS:
    raise ValueError(f"unknown network {network!r} after ':'; choose one of {sorted(NETWORKS)}")
  for field, value in NETWORKS[network].items():
    config.model[field] = value


def get_config(network="preact_resnet18"):
  config = get_base_config()
  config.method = "pgd_at"
  config.data.name = "cifar10"
  config.data.augment = True
  set_network(config, network)
  config.attack.norm = "linf"
  config.attack.epsilon = 8 / 255
  config.attack.name = "pgd"
  config.attack.steps = 10
  config.attack.step_size = 2 / 255
  config.attack.random_start = True
  config.attack.bn_mode = "batch"
  config.train.batch_size = 128
  config.train.epochs = 200
  config.train.optimizer = "sgd"
  config.train.learning_rate = 0.1
  config.train.momentum = 0.9
  config.train.nesterov = False
  config.train.weight_decay = 5e-4
  config.train.schedule = "piecewise"
  config.train.warmup_epochs = 0
  config.train.piecewise_boundaries = (100 / 200, 150 / 200)
  config.train.log_every = 100
  config.train.checkpoint_every = 1000
  config.train.eval_every = 1
  config.eval.during_train_examples = 1000
  config.eval.batch_size = 500
  return config
