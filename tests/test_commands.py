"""The commands as a user runs them, in real processes: reports that accumulate, one line and exit
code 2 for every bad input with the workdir left byte-identical, help that lists every field."""

import os
import shutil
import sys

import numpy as np
import pytest

from tests import processes
from tests.processes import cache, finished  # pylint: disable=unused-import  (fixtures)

pytestmark = pytest.mark.slow


def test_evaluate_after_training_adds_autoattack_and_keeps_every_attack(finished, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(finished, workdir)
  checkpoints = {k: v for k, v in processes.digest(workdir).items() if k.startswith("checkpoints")}
  before = processes.read_report(workdir)
  result = processes.run([sys.executable, "-m", "clead_jax.evaluate", "--workdir", workdir,
                 "--attacks=autoattack"])
  assert result.returncode == 0, result.stderr[-3000:]
  after = processes.read_report(workdir)
  for name in ("fgsm", "pgd20", "pgd100", "cw"):
    assert after["robust_accuracy"][name] == before["robust_accuracy"][name]
    assert after["measured"][name] == before["measured"][name]
  assert "autoattack" in after["robust_accuracy"]
  assert "clead_jax.evaluate" in after["measured"]["autoattack"]["command"]
  assert "clead_jax.main" in after["measured"]["pgd20"]["command"]
  # The worst case is over all five attacks, per example, from the stored flags.
  flags = np.load(os.path.join(workdir, "report_examples.npz"))
  every = flags["clean"].copy()
  for name in ("fgsm", "pgd20", "pgd100", "cw", "autoattack"):
    every &= flags[name]
  assert after["worst_case_accuracy"] == pytest.approx(every.mean())
  assert after["worst_case_accuracy"] <= min(after["robust_accuracy"].values())
  after_checkpoints = {k: v for k, v in processes.digest(workdir).items()
                       if k.startswith("checkpoints")}
  assert after_checkpoints == checkpoints


BAD_INPUTS = [
    # (what, command after the program, start of the one line)
    ("unknown config section", ["--config", "configs/digits.py", "--config.attak.epsilon=0.1"],
     "error: --config.attak.epsilon: the config has no field 'attak' (did you mean "
     "config.attack.epsilon"),
    ("unknown config field", ["--config", "configs/digits.py", "--config.attack.epsilonn=0.1"],
     "error: --config.attack.epsilonn: the config has no field 'epsilonn' (did you mean "
     "config.attack.epsilon"),
    ("missing config file", ["--config", "configs/nope.py"], "error: --config configs/nope.py:"),
    ("override without --config", ["--config.train.epochs=3"],
     "error: --config.train.epochs=3 overrides a config field, but no --config FILE was given"
     .replace("=3", "")),
    ("value of the wrong type", ["--config", "configs/digits.py", "--config.train.epochs=three"],
     "error: "),
    ("out-of-range value", ["--config", "configs/digits.py", "--config.attack.epsilon=-0.1"],
     "error: config.attack.epsilon=-0.1"),
    ("zero test examples", ["--config", "configs/digits.py", "--config.eval.num_examples=0"],
     "error: config.eval.num_examples=0 must be -1 (the whole test split)"),
]


@pytest.mark.parametrize("what,args,line", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_training_input_is_one_line_and_the_workdir_is_untouched(finished, tmp_path, what,
                                                                     args, line):
  workdir = str(tmp_path / "run")
  shutil.copytree(finished, workdir)
  before = processes.digest(workdir)
  result = processes.run([sys.executable, "-m", "clead_jax.main", "--workdir", workdir, *args])
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2 and len(lines) == 1, (what, result.stderr[-3000:])
  assert lines[0].startswith(line), (what, lines[0])
  assert processes.digest(workdir) == before


def test_missing_workdir_is_one_line():
  result = processes.run([sys.executable, "-m", "clead_jax.main", "--config", "configs/digits.py"])
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      "error: --workdir is required: Directory for checkpoints, metrics and reports."]


@pytest.mark.parametrize("count", ["0", "-5"])
def test_evaluate_refuses_zero_and_negative_example_counts(finished, tmp_path, count):
  workdir = str(tmp_path / "run")
  shutil.copytree(finished, workdir)
  before = processes.digest(workdir)
  result = processes.run([sys.executable, "-m", "clead_jax.evaluate", "--workdir", workdir,
                 "--attacks=fgsm", f"--num_examples={count}"])
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
  assert lines[0].startswith(f"error: --num_examples={count} must be -1 (the whole test split)")
  assert processes.digest(workdir) == before


def test_a_changed_model_names_the_config_field(finished, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(finished, workdir)
  before = processes.digest(workdir)
  result = processes.run(processes.main_command(workdir, processes.ALL_ATTACKS,
                                                "--config.model.width=12"))
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
  assert "config.model.width: checkpoint 8, now 12" in lines[0]
  assert processes.digest(workdir) == before


def test_a_non_finite_loss_before_the_first_checkpoint_says_so(tmp_path, cache):
  result = processes.run(processes.main_command(tmp_path / "run",
                                                "--config.train.learning_rate=1e30", cache=cache))
  lines = processes.messages(result.stderr)
  assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
  assert "non-finite" in lines[0] and "no checkpoint was saved yet" in lines[0], lines[0]
  assert "None" not in lines[0] and "Traceback" not in result.stderr


# PyTorch made unimportable in a real process, as on a machine without the [torch] extra.
_WITHOUT_TORCH = "import sys, runpy; sys.modules['torch'] = None; sys.argv[0] = '{0}'; " \
                 "runpy.run_module('{0}', run_name='__main__')"


@pytest.mark.parametrize("module,args,line", [
    ("clead_jax.bench", ["train_step", "--model", "small_cnn", "--compare", "torch"],
     "error: --compare torch needs PyTorch, an optional extra: pip install -e '.[torch]'"),
    ("clead_jax.export", ["--workdir", "WORKDIR", "--out", "OUT.pt"],
     "error: PyTorch is not installed; pip install -e '.[torch]'"),
], ids=["bench", "export"])
def test_commands_needing_pytorch_say_so_in_one_line(finished, tmp_path, module, args, line):
  args = [a.replace("WORKDIR", finished).replace("OUT", str(tmp_path / "model")) for a in args]
  before = processes.digest(finished)
  result = processes.run([sys.executable, "-c", _WITHOUT_TORCH.format(module), *args])
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith(line), (
      result.stderr[-3000:])
  assert processes.digest(finished) == before and not os.listdir(tmp_path)


def test_main_help_lists_every_config_field_and_every_registered_name():
  from clead_jax import config_tools  # pylint: disable=g-import-not-at-top
  from clead_jax import default_config  # pylint: disable=g-import-not-at-top
  from clead_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  from clead_jax import methods  # pylint: disable=g-import-not-at-top
  from clead_jax import models  # pylint: disable=g-import-not-at-top
  from clead_jax.evaluation import suite  # pylint: disable=g-import-not-at-top
  result = processes.run([sys.executable, "-m", "clead_jax.main", "--help"])
  assert result.returncode == 0, result.stderr[-3000:]
  text = result.stdout
  fields = config_tools.flatten(default_config.get_base_config().to_dict())
  missing = [f for f, v in fields.items() if f"  {f} = {v!r}" not in text]
  assert not missing, missing
  # The meaning of a field, from the comment beside it in default_config.py.
  assert "attack.norm = 'linf'  # linf or l2" in text
  flat = " ".join(text.split())
  for title, names in (("methods", methods.METHODS), ("datasets", input_pipeline.DATASETS),
                       ("models", models.MODELS), ("attacks", suite.ATTACK_NAMES)):
    listed = flat.split(f"{title} (", 1)[1].split(": ", 1)[1]
    assert all(name in listed for name in names), (title, listed[:300])


def test_bench_errors_are_one_line():
  result = processes.run([sys.executable, "-m", "clead_jax.bench", "train_step", "--model",
                          "nonsense"])
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (
      result.stderr[-3000:])
