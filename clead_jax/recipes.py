"""The training recipes that configs/*.py share, as functions of the package, so that a config file
works from any directory (`--config /any/path/configs/x.py`, with python -m and with the console
scripts). Each configs/ file holds its command and calls one of these; the values and their
reasons are written here.
"""

from clead_jax.default_config import get_base_config

# Networks by the short name a config takes after ':'.
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


def digits():
  """C-LEAD on scikit-learn's 8x8 digits, L-inf 0.2: the offline quickstart."""
  config = get_base_config()
  config.data.name = "digits"
  config.model.name = "small_cnn"
  config.model.width = 16
  config.attack.epsilon = 0.2
  config.attack.steps = 10
  config.attack.step_size = 0.05
  config.train.batch_size = 128
  config.train.epochs = 30
  config.train.learning_rate = 0.1
  config.train.warmup_epochs = 1
  config.train.log_every = 20
  config.train.checkpoint_every = 100
  config.eval.batch_size = 360
  return config


FASHION_MNIST_VARIANTS = ("gpu", "cpu", "cpu_full", "published")


def fashion_mnist(variant="gpu"):
  """C-LEAD on Fashion-MNIST (28x28 grayscale), L-inf epsilon 0.1, TRADES' SmallCNN.

  gpu: the full recipe. All 60,000 training images (no validation split: the report evaluates
    the last step), PGD-10 of epsilon/4 from a random start, batch 128, 30 epochs of SGD
    (momentum 0.9, weight decay 5e-4) with lr 0.05 on a cosine schedule after a 1-epoch warm-up,
    with weight averaging (EMA decay 0.999, the usual value: a horizon of about 1,000 steps, 2 of
    the 30 epochs); the report measures the averaged weights. 30 epochs: adversarially trained MNIST-family CNNs are near their plateau by then,
    and 30 epochs of all four methods fit one GPU session (launch/gpu_fashion_mnist.sh).
  cpu: the same recipe cut to ~10 minutes per run on a 2-core CPU: the first 10,000 training
    images (the last 5,000 of the split are held out as validation), width 16 (channels 16, 16,
    32, 32, dense 100), 8 epochs, batch 128, no weight averaging (the recipe of RESULTS.md 1b);
    PGD-20 on 500 validation images after epochs 2, 4 and 6 picks DIR/best_checkpoint, and the
    report evaluates the first 1,000 test images.
  cpu_full: the full training split on a 2-core CPU, one robust run (training and FGSM/PGD-20 on
    all 10,000 test images, no AutoAttack) in <= 20 minutes on the idle machine. The last 5,000
    training images are held out as validation and the other 55,000 are all trained on. What was
    cut, and why:
      - width 16, as cpu: doubling the width about quadruples the cost of every convolution but
        the first;
      - 4 epochs (1,716 steps of batch 128): C-LEAD with PGD-10 at width 16 trains at 270-330
        images/s on the 2 idle cores (the cpu recipe's 80,000 images in 294 s; a short timed run
        of this recipe, 300-330), so an epoch takes 2.8-3.4 minutes and 4 epochs 11-14 minutes,
        leaving room for compilation, validation and the test evaluation (~2 minutes) under 20
        minutes even at the slow end; 5 epochs would reach ~19 minutes there. More data beats
        more epochs: the cpu recipe's 625 steps on 10,000 images already reach 68 % PGD-20;
      - lr 0.02, not 0.05: a C-LEAD run of this recipe at 0.05 diverged at step ~410 (lr 0.046,
        near the end of the 1-epoch warm-up: gradient norm 3 -> 58, then a network with constant
        outputs at 10 % accuracy for the rest of the run); 0.02 leaves a margin below that;
      - the training attack stays PGD-10 of epsilon/4 from a random start, as in gpu and cpu, so
        that an N-FGSM run (attack.name=nfgsm, about 3x cheaper) is an ablation of this recipe rather
        than its default;
      - weight averaging with decay 0.995: a horizon of ~200 steps (half an epoch), short enough
        to follow 4 epochs of a cosine schedule (0.999 would still remember epoch 2);
      - PGD-20 on 1,000 validation images after each of epochs 1 to 3 picks DIR/best_checkpoint
        (about 7 s each, of the averaged weights);
      - the report: FGSM and PGD-20 on all 10,000 test images (about 1.5 minutes), no robustness
        curve (9 more PGD-20 runs); add attacks (pgd100, autoattack on --num_examples=1000) with
        the evaluate command.
    Measured once (seed 0, the averaged weights, all 10,000 test images): C-LEAD clean 83.8 %,
    FGSM 74.2 %, PGD-20 70.7 %; validation PGD-20 62.6, 68.6, 70.6 % after epochs 1-3. On the
    idle 2-core machine the same command took 803 s (13.4 minutes: train 713 s, evaluation 72 s)
    and gave the same accuracies (clead_jax/results/fashion_mnist_cpu_full/); on the 2 cores
    shared with other jobs it had taken 28.6 minutes.
    Standard training with this recipe: clean 89.2 %, FGSM 13.5 %, PGD-20 0.2 % (5.8 minutes).
  published: the PGD-AT recipe behind the public Fashion-MNIST AutoAttack number (MTandHJ/
    PyTorch-Robust, L-inf epsilon 0.3: 77.76 % clean, 45.99 % AutoAttack on the 10,000 test
    images), as its README's command gives it: TRADES' SmallCNN at width 32 (32, 32, 64, 64, dense
    200; theirs has dropout 0.5 before the last layers, ours none), PGD-40 of step 1/30 from a
    random start, Adam at lr 1e-4 (no weight decay, constant), batch 50, 84 epochs on all 60,000
    training images, no weight averaging; FGSM, PGD-20, PGD-100 and AutoAttack on the whole test
    split. About 100,000 steps of 41 passes each: days on a 2-core CPU (RESULTS.md, 1d, has a
    4-epoch PGD-10 cut of it).
  """
  if variant not in FASHION_MNIST_VARIANTS:
    raise ValueError(f"unknown variant {variant!r} after ':'; choose one of "
                     f"{', '.join(FASHION_MNIST_VARIANTS)}")
  config = get_base_config()
  config.data.name = "fashion_mnist"
  config.model.name = "mnist_cnn"
  config.model.width = 32
  config.attack.norm = "linf"
  config.attack.epsilon = 0.1
  config.attack.name = "pgd"
  config.attack.steps = 10
  config.attack.step_size = 0.025
  config.attack.random_start = True
  config.train.batch_size = 128
  config.train.epochs = 30
  config.train.optimizer = "sgd"
  config.train.learning_rate = 0.05
  config.train.momentum = 0.9
  config.train.weight_decay = 5e-4
  config.train.schedule = "cosine"
  config.train.warmup_epochs = 1
  config.train.log_every = 100
  config.train.checkpoint_every = 1000
  config.train.ema_decay = 0.999
  config.eval.batch_size = 500
  if variant == "cpu_full":
    config.data.validation_size = 5000
    config.data.train_size = -1
    config.model.width = 16
    config.train.epochs = 4
    config.train.learning_rate = 0.02
    config.train.ema_decay = 0.995
    config.train.eval_every = 1
    config.train.log_every = 20
    config.train.checkpoint_every = 200
    config.eval.attacks = "fgsm,pgd20"
    config.eval.curve_points = 0
    config.eval.num_examples = -1
    config.eval.during_train_examples = 1000
  if variant == "published":
    config.method = "pgd_at"
    config.attack.epsilon = 0.3
    config.attack.steps = 40
    config.attack.step_size = 1 / 30
    config.train.batch_size = 50
    config.train.epochs = 84
    config.train.optimizer = "adam"
    config.train.learning_rate = 1e-4
    config.train.weight_decay = 0.0
    config.train.schedule = "constant"
    config.train.warmup_epochs = 0
    config.train.ema_decay = 0.0
    config.eval.attacks = "fgsm,pgd20,pgd100,autoattack"
    config.eval.curve_points = 0
  if variant == "cpu":
    config.train.ema_decay = 0.0
    config.data.validation_size = 5000
    config.data.train_size = 10000
    config.model.width = 16
    config.train.epochs = 8
    config.train.eval_every = 2
    config.train.log_every = 20
    config.train.checkpoint_every = 200
    config.eval.num_examples = 1000
    config.eval.during_train_examples = 500
  return config


def _cifar10_pgd10(config):
  """What the CIFAR-10 recipes share: the data (augmented, the last 1,000 training images held out
  for validation), the L-inf 8/255 PGD-10 training attack of step 2/255 from a random start, and
  SGD with momentum 0.9 at lr 0.1, batch 128, on a piecewise schedule."""
  config.data.name = "cifar10"
  config.data.augment = True
  config.data.validation_size = 1000  # eval_every's split: the last 1,000 training images
  config.attack.norm = "linf"
  config.attack.epsilon = 8 / 255
  config.attack.name = "pgd"
  config.attack.steps = 10
  config.attack.step_size = 2 / 255
  config.attack.random_start = True
  config.train.batch_size = 128
  config.train.optimizer = "sgd"
  config.train.learning_rate = 0.1
  config.train.momentum = 0.9
  config.train.schedule = "piecewise"
  config.train.log_every = 100
  config.train.checkpoint_every = 1000
  config.eval.batch_size = 500
  return config


def cifar10():
  """C-LEAD on CIFAR-10 with ResNet-18 (configs/cifar10.py)."""
  config = _cifar10_pgd10(get_base_config())
  config.model.name = "resnet18"
  config.model.width = 64
  config.train.epochs = 100
  config.train.weight_decay = 5e-4
  config.train.piecewise_boundaries = (0.5, 0.75)
  config.train.eval_every = 10
  return config


def pgd_at_rice(network="preact_resnet18"):
  """PGD-AT as in Rice, Wong & Kolter 2020 (configs/cifar10_pgd_at.py)."""
  # Rice et al. stop early on 1,000 test images; we choose on 1,000 held-out training images.
  config = _cifar10_pgd10(get_base_config())
  config.method = "pgd_at"
  set_network(config, network)
  config.attack.bn_mode = "batch"
  config.train.epochs = 200
  config.train.nesterov = False
  config.train.weight_decay = 5e-4
  config.train.warmup_epochs = 0
  config.train.piecewise_boundaries = (100 / 200, 150 / 200)
  config.train.eval_every = 1
  config.eval.during_train_examples = 1000
  return config


TRADES_DECAY_EPOCHS = (75, 90, 100)  # 1-based epochs from which lr is divided by another 10


def trades_zhang(arg="wrn34"):
  """TRADES as in Zhang et al. 2019 (configs/cifar10_trades.py); arg is NETWORK[,EPOCHS]."""
  network, _, epochs = arg.partition(",")
  epochs = int(epochs) if epochs else 76
  config = _cifar10_pgd10(get_base_config())  # the best checkpoint: on held-out training images
  config.method = "trades"
  set_network(config, network)
  config.attack.bn_mode = "running"
  config.loss.trades_beta = 6.0
  config.train.epochs = epochs
  config.train.nesterov = False
  config.train.weight_decay = 2e-4 if network == "wrn34" else 5e-4
  config.train.warmup_epochs = 0
  # Epoch e (1-based) >= 75 trains at 0.01: the boundary is after e - 1 epochs.
  config.train.piecewise_boundaries = tuple((e - 1) / epochs for e in TRADES_DECAY_EPOCHS
                                            if e <= epochs)
  config.train.log_every = 100
  config.train.checkpoint_every = 1000
  config.train.eval_every = 1
  config.eval.during_train_examples = 1000
  return config
