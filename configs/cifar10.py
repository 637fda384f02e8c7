"""C-LEAD on CIFAR-10 with ResNet-18, L-inf epsilon 8/255, PGD-10 (step 2/255) during training.

  python -m clead_jax.main --config configs/cifar10.py --workdir runs/cifar10

Other methods: --config.method=pgd_at | trades | standard. WRN-34-10:
--config.model.name=wide_resnet --config.model.depth=34 --config.model.widen=10.
"""

from clead_jax.default_config import get_base_config


def get_config():
  config = get_base_config()
  config.data.name = "cifar10"
  config.data.augment = True
  config.model.name = "resnet18"
  config.model.width = 64
  config.attack.epsilon = 8 / 255
  config.attack.steps = 10
  config.attack.step_size = 2 / 255
  config.attack.random_start = True
  config.train.batch_size = 128
  config.train.epochs = 100
  config.train.optimizer = "sgd"
  config.train.learning_rate = 0.1
  config.train.momentum = 0.9
  config.train.weight_decay = 5e-4
  config.train.schedule = "piecewise"
  config.train.piecewise_boundaries = (0.5, 0.75)
  config.train.log_every = 100
  config.train.checkpoint_every = 1000
  config.train.eval_every = 10
  config.eval.batch_size = 500
  return config
