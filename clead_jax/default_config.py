"""The base config every file in configs/ starts from. Plain values only; code builds the rest."""

import ml_collections


def get_base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  # One of: standard, pgd_at, trades, clead (clead_jax/methods.py METHODS).
  config.method = "clead"
  # JAX's persistent compilation cache; "" turns it off.
  config.compilation_cache_dir = "~/.cache/clead_jax/xla"

  config.data = ml_collections.ConfigDict()
  # Also any other TFDS image-classification dataset by name, or npz:DIR: DIR/train.npz and
  # DIR/test.npz, each with uint8 NHWC "images" and integer "labels" (README, "Your own arrays").
  config.data.name = "digits"  # digits, fashion_mnist, cifar10, cifar100, svhn_cropped
  config.data.data_dir = ""  # TFDS data_dir; empty means TFDS's default (~/tensorflow_datasets)
  config.data.download = True  # let TFDS download and prepare a missing dataset
  config.data.augment = False  # random crop (pad 4) and horizontal flip, on the device
  # Training images held out (from the end of the training split) as the validation split, on
  # which train.eval_every evaluates and the best checkpoint is chosen; 0: no validation split.
  config.data.validation_size = 0
  config.data.train_size = -1  # the first N of the remaining training images; -1: all

  config.model = ml_collections.ConfigDict()
  # small_cnn (digits), mnist_cnn (TRADES' SmallCNN), resnet18, preact_resnet18, wide_resnet
  config.model.name = "small_cnn"
  config.model.width = 32  # base width (small_cnn, mnist_cnn, resnets)
  config.model.depth = 28  # wide_resnet only
  config.model.widen = 10  # wide_resnet only
  config.model.projection_dim = 128
  config.model.dtype = "float32"  # float32 or bfloat16 compute; params stay float32

  # The threat model (norm, epsilon) and the attack used to make training examples.
  config.attack = ml_collections.ConfigDict()
  config.attack.norm = "linf"  # linf or l2
  config.attack.epsilon = 0.2
  # pgd; fgsm (one step of epsilon); fgsm_rs (one step of 1.25 epsilon from a random start);
  # nfgsm (N-FGSM, de Jorge et al. 2022: one step from uniform noise, not projected to the ball)
  config.attack.name = "pgd"
  config.attack.steps = 10  # pgd only
  config.attack.step_size = 0.05  # pgd only
  config.attack.nfgsm_noise = 2.0  # nfgsm: the noise's radius k, in units of epsilon
  config.attack.nfgsm_step = 1.0  # nfgsm: the signed step, in units of epsilon
  # Start from a uniform point of the ball (pgd, fgsm; fgsm_rs always does) or, for trades,
  # from x + 0.001 N(0, 1); False: from x.
  config.attack.random_start = True
  # PGD's lax.fori_loop unroll factor: 1 compiles one loop body (fastest compile); attack.steps
  # unrolls the loop fully. See BENCHMARKS.md for what each costs.
  config.attack.unroll = 1
  config.attack.objective = "ce"  # ce, contrastive, both (clead only)
  config.attack.bn_mode = "running"  # running: BatchNorm running stats; batch: batch stats, not updated

  config.loss = ml_collections.ConfigDict()
  config.loss.temperature = 0.1  # InfoNCE tau
  config.loss.lam = 1.0  # InfoNCE weight lambda
  config.loss.clean_weight = 1.0  # weight of CE on clean images in C-LEAD
  config.loss.positives = "pair"  # pair, class (SupCon), instance
  config.loss.trades_beta = 6.0
  # TRADES: one joint forward pass of clean and adversarial images instead of the reference's two
  # separate train-mode passes (each with its own BatchNorm batch statistics).
  config.loss.trades_joint_pass = False

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 128  # global batch, over all devices of all processes
  config.train.epochs = 30
  config.train.pretrain_epochs = 0  # epochs of clean (standard) training before the method
  config.train.init_from = ""  # workdir of another run whose latest params start this one
  config.train.optimizer = "sgd"  # sgd or adam
  config.train.learning_rate = 0.1
  config.train.momentum = 0.9
  config.train.nesterov = False
  config.train.weight_decay = 5e-4
  config.train.schedule = "cosine"  # cosine (with warm-up), piecewise, constant
  config.train.warmup_epochs = 0
  config.train.piecewise_boundaries = (0.5, 0.75)  # fractions of training, each multiplies lr by 0.1
  config.train.log_every = 20
  config.train.checkpoint_every = 200
  config.train.keep_checkpoints = 3
  # Epochs between evaluations on the validation split (needs data.validation_size > 0); the best
  # checkpoint by PGD-20 accuracy there is kept in DIR/best_checkpoint. 0: only the final one.
  config.train.eval_every = 0
  # Weight averaging: an exponential moving average of the params and BatchNorm statistics with
  # decay min(ema_decay, (1 + step) / (10 + step)); 0: off. eval.weights says which are evaluated.
  config.train.ema_decay = 0.0
  # Adversarial weight perturbation (Wu et al. 2020): each kernel moves by gamma * ||w|| along
  # its loss gradient before the gradient is taken (pgd_at, trades, clead); 0: off.
  config.train.awp_gamma = 0.0
  config.train.awp_warmup_epochs = 0  # epochs trained without AWP first

  config.eval = ml_collections.ConfigDict()
  # fgsm, pgd20, pgd100, cw, autoattack (standard), autoattack_plus, autoattack_rand, and the
  # paper's black-box protocol transfer_pgd3 (needs eval.surrogate).
  config.eval.attacks = "fgsm,pgd20,pgd100,cw"
  config.eval.batch_size = 512
  config.eval.num_examples = -1  # the first N test images; -1: the whole test split
  config.eval.curve_points = 9  # robustness curve: epsilon from 0 to 2 epsilon
  config.eval.curve_attack = "pgd20"
  # The indicators of attack failure (clead_jax/evaluation/indicators.py): they re-run PGD and
  # AutoAttack's APGD stages on up to 512 points (18-36 % of the evaluation time of the
  # Fashion-MNIST runs of RESULTS.md on a CPU) and change no accuracy; False leaves them out.
  config.eval.indicators = True
  config.eval.during_train_examples = 512  # validation examples that eval_every evaluates on
  # Workdir of a standard run on the same data: the surrogate of transfer_pgd3.
  config.eval.surrogate = ""
  # The weights that the report, the best-checkpoint choice and export use: ema (the averaged
  # ones), raw, or auto (ema when train.ema_decay > 0, else raw).
  config.eval.weights = "auto"
  return config
