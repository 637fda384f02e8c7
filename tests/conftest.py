"""Shared fixtures: small configs and one trained digits model per test session."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
if os.environ.get("PYTEST_XDIST_WORKER"):
  # Two workers share the two cores: PyTorch's OpenMP threads (the reference AutoAttack, the
  # PyTorch twins) would otherwise spin against the other worker's work. Set before torch loads.
  os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def digits_config(**overrides):
  """configs/digits.py, shrunk for tests; `overrides` maps 'a.b' -> value."""
  from clead_jax import config_tools  # pylint: disable=g-import-not-at-top
  config = config_tools.load_config_file(os.path.join(REPO, "configs", "digits.py"))
  config.model.width = 8
  config.model.projection_dim = 16
  config.train.epochs = 1
  config.train.log_every = 5
  config.train.checkpoint_every = 5
  config.eval.attacks = "fgsm,pgd20"
  config.eval.curve_points = 3
  config.eval.num_examples = 120
  return config_tools.set_fields(config, overrides)


@pytest.fixture(scope="session")
def trained_digits(tmp_path_factory):
  """A small CNN trained cleanly on digits through train_and_evaluate; (config, workdir, report)."""
  from clead_jax import train  # pylint: disable=g-import-not-at-top
  config = digits_config(**{"method": "standard", "train.epochs": 8, "model.width": 16,
                            "train.learning_rate": 0.05})
  workdir = str(tmp_path_factory.mktemp("trained_digits"))
  report = train.train_and_evaluate(config, workdir)
  return config, workdir, report


# The test files that take longest (the most seconds of one worker on the 2-core machine), in
# that order. Run first: with `-n 2 --dist loadfile --no-loadscope-reorder` (README's command) a
# free worker takes the next file in collection order, so the long files start early and the short
# ones fill in at the end, instead of one worker running a long file alone while the other waits
# (xdist's default order, most tests first, left one worker idle for the last 130 s).
LONGEST_FIRST = ("test_signals", "test_multiprocess", "test_resume", "test_study_plan",
                 "test_commands", "test_torch", "test_newcomer", "test_structure",
                 "test_recipes_ema_awp", "test_attacks")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: files keep their order
