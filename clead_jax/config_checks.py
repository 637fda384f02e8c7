"""Checks a config before any work starts: every bad value is a one-line UserError naming the
field, what is wrong and how to fix it."""

from clead_jax import attacks
from clead_jax import input_pipeline
from clead_jax import losses
from clead_jax import methods
from clead_jax import models
from clead_jax import train_state
from clead_jax.errors import UserError
from clead_jax.evaluation import suite


def _choice(config, field, choices):
  value = config
  for part in field.split("."):
    value = value[part]
  if value not in choices:
    raise UserError(f"config.{field}={value!r} is unknown; choose one of {sorted(choices)}")


def _at_least(value, bound, field, strict=False):
  bad = value <= bound if strict else value < bound
  if bad:
    relation = ">" if strict else ">="
    raise UserError(f"config.{field}={value!r} must be {relation} {bound}; "
                    f"set --config.{field} to a valid value")


def validate(config):
  _choice(config, "method", methods.METHODS)
  input_pipeline.check_name(config.data.name)
  _choice(config, "model.name", models.MODELS)
  _choice(config, "model.dtype", ("float32", "bfloat16"))
  _choice(config, "attack.norm", attacks.NORMS)
  _choice(config, "attack.name", attacks.TRAIN_ATTACKS)
  _choice(config, "attack.objective", ("ce", "contrastive", "both"))
  _choice(config, "attack.bn_mode", ("running", "batch"))
  _choice(config, "loss.positives", losses.POSITIVES)
  _choice(config, "train.optimizer", ("sgd", "adam"))
  _choice(config, "train.schedule", ("cosine", "piecewise", "constant"))
  _choice(config, "eval.weights", train_state.WEIGHTS)
  _choice(config, "eval.indicators", (False, True))
  _at_least(config.attack.epsilon, 0.0, "attack.epsilon")
  _at_least(config.attack.step_size, 0.0, "attack.step_size")
  _at_least(config.attack.steps, 1, "attack.steps")
  _at_least(config.attack.unroll, 1, "attack.unroll")
  _at_least(config.loss.temperature, 0.0, "loss.temperature", strict=True)
  _at_least(config.loss.lam, 0.0, "loss.lam")
  _at_least(config.loss.clean_weight, 0.0, "loss.clean_weight")
  _at_least(config.loss.trades_beta, 0.0, "loss.trades_beta")
  _at_least(config.model.projection_dim, 1, "model.projection_dim")
  _at_least(config.model.width, 1, "model.width")
  _at_least(config.train.batch_size, 1, "train.batch_size")
  _at_least(config.train.epochs, 1, "train.epochs")
  _at_least(config.train.pretrain_epochs, 0, "train.pretrain_epochs")
  _at_least(config.train.learning_rate, 0.0, "train.learning_rate")
  _at_least(config.train.weight_decay, 0.0, "train.weight_decay")
  _at_least(config.train.warmup_epochs, 0, "train.warmup_epochs")
  _at_least(config.train.log_every, 1, "train.log_every")
  _at_least(config.train.checkpoint_every, 1, "train.checkpoint_every")
  _at_least(config.train.keep_checkpoints, 1, "train.keep_checkpoints")
  _at_least(config.train.eval_every, 0, "train.eval_every")
  _at_least(config.eval.batch_size, 1, "eval.batch_size")
  _at_least(config.eval.curve_points, 0, "eval.curve_points")
  _at_least(config.attack.nfgsm_noise, 0.0, "attack.nfgsm_noise")
  _at_least(config.attack.nfgsm_step, 0.0, "attack.nfgsm_step", strict=True)
  _at_least(config.train.awp_gamma, 0.0, "train.awp_gamma")
  _at_least(config.train.awp_warmup_epochs, 0, "train.awp_warmup_epochs")
  if not 0.0 <= config.train.ema_decay < 1.0:
    raise UserError(f"config.train.ema_decay={config.train.ema_decay!r} must be in [0, 1) (0 turns "
                    "weight averaging off; 0.999 is usual); set --config.train.ema_decay")
  if config.eval.weights == "ema" and not config.train.ema_decay:
    raise UserError("config.eval.weights='ema' evaluates the averaged weights, but "
                    "config.train.ema_decay=0 averages none; set --config.train.ema_decay (e.g. "
                    "0.999) or --config.eval.weights=auto")
  if config.train.awp_gamma and config.method not in ("pgd_at", "trades", "clead"):
    raise UserError(f"config.train.awp_gamma={config.train.awp_gamma} perturbs the weights on an "
                    f"adversarial loss, and config.method={config.method!r} has none; use pgd_at, "
                    "trades or clead, or awp_gamma=0")
  if config.train.pretrain_epochs > config.train.epochs:
    raise UserError(f"config.train.pretrain_epochs={config.train.pretrain_epochs} exceeds "
                    f"config.train.epochs={config.train.epochs}; lower it or raise epochs")
  if config.model.name == "wide_resnet" and (config.model.depth - 4) % 6:
    raise UserError(f"config.model.depth={config.model.depth}: WideResNet depth must be 6n+4 "
                    "(e.g. 28 or 34); set --config.model.depth")
  _at_least(config.eval.during_train_examples, 1, "eval.during_train_examples")
  _at_least(config.data.validation_size, 0, "data.validation_size")
  if config.data.train_size != -1:
    _at_least(config.data.train_size, 1, "data.train_size")
  if config.eval.num_examples != -1 and config.eval.num_examples < 1:
    raise UserError(f"config.eval.num_examples={config.eval.num_examples} must be -1 (the whole "
                    "test split) or a positive count of test images; set "
                    "--config.eval.num_examples accordingly")
  if config.attack.name in ("fgsm_rs", "nfgsm") and not config.attack.random_start:
    raise UserError(f"config.attack.name={config.attack.name!r} starts from random noise, but "
                    "config.attack.random_start=False; use attack.name=fgsm for FGSM from x")
  if config.train.eval_every and not config.data.validation_size:
    raise UserError(f"config.train.eval_every={config.train.eval_every} evaluates on a validation "
                    "split, and config.data.validation_size=0 holds none out; set "
                    "--config.data.validation_size=N (the last N training images), or "
                    "eval_every=0")
  names = suite.parse_attack_names(config.eval.attacks)
  if any(name in suite.TRANSFER_ATTACKS for name in names) and not config.eval.surrogate:
    raise UserError("config.eval.attacks has transfer_pgd3, which needs config.eval.surrogate: "
                    "the workdir of a standard run on the same data")
  if config.eval.curve_points:
    _choice(config, "eval.curve_attack", suite.WHITE_BOX_ATTACKS)
