"""Bad config values stop the run before any work, with one line naming the field."""

import os
import subprocess
import sys

import pytest

from clead_jax import config_checks
from clead_jax.errors import UserError
from tests.conftest import REPO, digits_config


@pytest.mark.parametrize("field,value,named", [
    ("attack.epsilon", -0.1, "config.attack.epsilon"),
    ("method", "adversarial_magic", "config.method"),
    ("data.name", "mnist_typo", "config.data.name"),
    ("model.name", "resnet9000", "config.model.name"),
    ("loss.positives", "everything", "config.loss.positives"),
    ("loss.temperature", 0.0, "config.loss.temperature"),
    ("attack.norm", "l1", "config.attack.norm"),
    ("eval.attacks", "pgd20,nonsense", "config.eval.attacks"),
    ("train.pretrain_epochs", 99, "config.train.pretrain_epochs"),
    ("attack.unroll", 0, "config.attack.unroll"),
])
def test_bad_values_name_the_field(field, value, named):
  with pytest.raises(UserError) as error:
    config_checks.validate(digits_config(**{field: value}))
  assert named in str(error.value) and "\n" not in str(error.value)


def test_shipped_configs_are_valid():
  import importlib  # pylint: disable=g-import-not-at-top
  for name in ["digits", "cifar10", "cifar100", "svhn", "cifar10_pgd_at", "cifar10_trades",
               "cifar10_wrn34", "cifar100_pgd_at", "cifar100_trades"]:
    config_checks.validate(importlib.import_module(f"configs.{name}").get_config())


def _main(tmp_path, *overrides, devices=1):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             TF_CPP_MIN_LOG_LEVEL="3")
  return subprocess.run(
      [sys.executable, "-m", "clead_jax.main", "--config", "configs/digits.py",
       "--workdir", str(tmp_path / "run"), *overrides],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_cli_negative_epsilon_is_one_line_and_nonzero_exit(tmp_path):
  result = _main(tmp_path, "--config.attack.epsilon=-0.03")
  assert result.returncode != 0
  lines = result.stderr.strip().splitlines()
  assert lines[-1].startswith("error: config.attack.epsilon=-0.03"), result.stderr[-2000:]
  assert not os.path.exists(tmp_path / "run")  # nothing was started


def test_cli_batch_not_divisible_by_devices(tmp_path):
  result = _main(tmp_path, "--config.train.batch_size=100", devices=8)
  assert result.returncode != 0
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: config.train.batch_size=100") and "8 devices" in last, last


def test_resume_config_check_accepts_fields_added_later_at_their_default():
  """A checkpoint written before a config field existed resumes when that field is left at its
  default; a changed value of it, or of any other optimisation field, is still refused."""
  from clead_jax import checkpointing  # pylint: disable=g-import-not-at-top
  current = digits_config().to_dict()
  stored = digits_config().to_dict()
  del stored["attack"]["unroll"]
  assert checkpointing.config_mismatches(stored, current) == []
  current["attack"]["unroll"] = 10
  assert checkpointing.config_mismatches(stored, current) == [("attack.unroll", None, 10)]
  current["attack"]["unroll"] = 1
  current["train"]["log_every"] = 7  # a resumable field
  current["train"]["learning_rate"] = 0.5
  assert [f for f, _, _ in checkpointing.config_mismatches(stored, current)] == [
      "train.learning_rate"]
