"""The shape of the package: no import circle, flags only in the commands, every command a console
script in the README, and every shipped config usable from any directory."""

import ast
import glob
import os
import shutil
import subprocess
import sys
import tomllib

import pytest

from tests.conftest import REPO

PACKAGE = os.path.join(REPO, "clead_jax")


def _module_name(path):
  relative = os.path.relpath(path, REPO)[:-len(".py")].split(os.sep)
  return ".".join(relative[:-1] if relative[-1] == "__init__" else relative)


def _is_module(name):
  path = os.path.join(REPO, *name.split("."))
  return os.path.exists(path + ".py") or os.path.isdir(path)


def _imports(path):
  """The clead_jax modules a file imports, at the top or inside functions (lazy imports)."""
  tree = ast.parse(open(path).read(), path)
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names if a.name.startswith("clead_jax"))
    elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("clead_jax"):
      for alias in node.names:
        name = f"{node.module}.{alias.name}"
        found.add(name if _is_module(name) else node.module)
  return found


def import_graph():
  modules = {_module_name(p): p for p in glob.glob(os.path.join(PACKAGE, "**", "*.py"),
                                                   recursive=True)}
  return {name: sorted(m for m in _imports(path) if m != name) for name, path in modules.items()}


def find_cycle(graph):
  """One import circle as a list of modules, or None (depth-first search)."""
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in graph.get(node, ()):
      if state.get(nxt) == "open":
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        cycle = visit(nxt)
        if cycle:
          return cycle
    state[node] = "done"
    stack.pop()
    return None

  for node in sorted(graph):
    if node not in state:
      cycle = visit(node)
      if cycle:
        return cycle
  return None


def test_the_cycle_finder_finds_a_circle():
  assert find_cycle({"a": ["b"], "b": ["c"], "c": ["a"]}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": ["b"], "b": ["c"], "c": []}) is None


def test_no_import_circle_in_the_package():
  graph = import_graph()
  assert len(graph) > 30 and "clead_jax.evaluation.suite" in graph["clead_jax.train"]
  assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_autoattack_holds_only_attacks():
  """autoattack/ imports nothing of clead_jax but itself, perturbation and losses."""
  for name, imported in import_graph().items():
    if name.startswith("clead_jax.autoattack"):
      outside = [m for m in imported if not m.startswith("clead_jax.autoattack")
                 and m not in ("clead_jax.perturbation", "clead_jax.losses")]
      assert not outside, (name, outside)


def _scripts():
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)["project"]["scripts"]


def test_flags_are_defined_only_by_commands_and_only_when_they_run():
  """absl flags are defined inside _define_flags() of modules that are console scripts (so that
  importing any module defines none), and every module that runs as a command is a script."""
  commands = {target.split(":")[0] for target in _scripts().values()}
  for path in glob.glob(os.path.join(PACKAGE, "**", "*.py"), recursive=True):
    name = _module_name(path)
    tree = ast.parse(open(path).read(), path)
    defines = []
    for node in ast.walk(tree):
      if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
          and node.func.attr.startswith("DEFINE")):
        defines.append(node)
    if defines:
      assert name in commands, f"{name} defines flags but is not a console script"
      inside = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
                and f.name == "_define_flags" for n in ast.walk(f)}
      assert all(id(n) in inside for n in defines), f"{name}: a flag outside _define_flags()"
    runs_as_command = "if __name__ == \"__main__\":" in open(path).read()
    if runs_as_command and not name.endswith("__main__"):
      assert name in commands, f"{name} runs as a command but is not a console script"


def test_every_console_script_is_in_the_readme():
  readme = open(os.path.join(REPO, "README.md")).read()
  for script in _scripts():
    assert f"`{script}`" in readme, script


def _configs():
  names = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "configs", "*.py")))
  return names + ["fashion_mnist.py:cpu"]


@pytest.mark.slow
@pytest.mark.parametrize("config", _configs())
def test_every_config_runs_from_outside_the_repository(tmp_path, config):
  """From another directory, each shipped config loads and gets as far as its data: one line
  (no dataset here: the dataset message; digits: a deliberately oversized batch) and exit 2."""
  path = os.path.join(REPO, "configs", config if ":" in config else config + ".py")
  args = ["--config", path, "--workdir", str(tmp_path / "run"),
          f"--config.data.data_dir={tmp_path / 'no_data'}", "--config.data.download=False"]
  if config == "digits":
    args.append("--config.train.batch_size=100000")
  launcher = [sys.executable, "-m", "clead_jax.main"]
  if config == "cifar10_wrn34" and shutil.which("clead-train"):
    launcher = ["clead-train"]  # the console script, as the issue tried it
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  result = subprocess.run(launcher + args, cwd=str(tmp_path), env=env, capture_output=True,
                          text=True, timeout=300)
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
  if config == "digits":
    assert "config.train.batch_size=100000 exceeds" in lines[0]
  else:
    assert lines[0].startswith("error: dataset ") and "is not prepared in" in lines[0]
  assert not (tmp_path / "run").exists()
