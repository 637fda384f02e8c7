"""Small helpers every part uses on configs and files: a dotted field's value, setting it,
flattening a nested config, loading a config file by path, and atomic writes.

A leaf module (it imports nothing of clead_jax).
"""

import difflib
import importlib.util
import os


def get_field(config, field):
  """config['a']['b'] for field 'a.b'; KeyError naming the first missing part."""
  node = config
  for part in field.split("."):
    if not hasattr(node, "keys") or part not in node:
      raise KeyError(part)
    node = node[part]
  return node


def set_field(config, field, value):
  *parents, leaf = field.split(".")
  node = config
  for part in parents:
    node = node[part]
  node[leaf] = value


def set_fields(config, overrides):
  """Applies {'a.b': value, ...}; returns the config."""
  for field, value in (overrides or {}).items():
    set_field(config, field, value)
  return config


def flatten(tree, prefix=""):
  """{'a': {'b': 1}} -> {'a.b': 1}."""
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if hasattr(value, "items"):
      flat.update(flatten(value, name + "."))
    else:
      flat[name] = value
  return flat


def nearest_fields(field, config, count=3):
  """The config fields whose dotted names are closest to `field` (for 'did you mean')."""
  names = list(flatten(config.to_dict() if hasattr(config, "to_dict") else config))
  return difflib.get_close_matches(field, names, n=count, cutoff=0.5)


def parse_value(text, like):
  """`text` as the type of `like` (bool, int, float or str); ValueError if it is not one."""
  if isinstance(like, bool):
    if text.lower() not in ("true", "false", "1", "0"):
      raise ValueError(f"{text!r} is not a bool")
    return text.lower() in ("true", "1")
  if isinstance(like, int):
    return int(text)
  if isinstance(like, float):
    return float(text)
  if isinstance(like, str):
    return text
  raise TypeError(f"fields of type {type(like).__name__} cannot be set from text")


def load_config_file(path, argument=None):
  """get_config([argument]) of a config file, loaded by path (as --config PATH[:ARG] does)."""
  spec = importlib.util.spec_from_file_location(
      "clead_config_" + os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config() if argument is None else module.get_config(argument)


def atomic_write(path, text):
  """Writes `text` to a temporary file and renames it over `path`."""
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def save_figure(fig, path):
  """A matplotlib figure to `path` (PNG), atomically, and closes it."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  tmp = f"{path}.tmp.{os.getpid()}.png"
  fig.tight_layout()
  fig.savefig(tmp, dpi=120)
  plt.close(fig)
  os.replace(tmp, path)

