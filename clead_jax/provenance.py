"""Fingerprints that tie a number to the weights and the training config that made it.

A report, AutoAttack's saved progress, a cross-check, an exported file and a study row each carry
`weights_fingerprint` (of the parameters and BatchNorm statistics exactly as evaluated: averaged
or raw) and `config_fingerprint` (of the training config: the fields that change the trained
weights). Two evaluations with different fingerprints are never merged.

A fingerprint is the first 16 hex digits of a SHA-256 over every array's path, dtype, shape and
bytes (weights) or over the config's canonical JSON (config). Leaf module: imports no other
clead_jax module.
"""

import hashlib
import json

import jax
import numpy as np

FINGERPRINT_DIGITS = 16
# Fields that change neither the trained weights nor what they are: how often training logs and
# saves, where data and caches live, and every evaluation setting (the report's identity has its
# own epsilon, norm and examples).
_TRAINING_NEUTRAL_FIELDS = ("train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
                            "data.data_dir", "data.download", "compilation_cache_dir")
_TRAINING_NEUTRAL_SECTIONS = ("eval.",)


def _host_array(leaf):
  """This process's copy of a (replicated) array as numpy."""
  if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
    leaf = leaf.addressable_data(0)
  return np.asarray(jax.device_get(leaf))


def weights_fingerprint(variables) -> str:
  """Of a variables tree ({'params': ..., 'batch_stats': ...}); equal trees give equal ones."""
  digest = hashlib.sha256()
  leaves = jax.tree_util.tree_flatten_with_path(variables)[0]
  for path, leaf in sorted(leaves, key=lambda item: jax.tree_util.keystr(item[0])):
    array = np.ascontiguousarray(_host_array(leaf))
    digest.update(jax.tree_util.keystr(path).encode())
    digest.update(f"|{array.dtype.str}|{array.shape}|".encode())
    digest.update(array.tobytes())
  return digest.hexdigest()[:FINGERPRINT_DIGITS]


def _flatten(tree, prefix=""):
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def training_fields(config) -> dict:
  """The config's fields that decide the trained weights, flat ('train.epochs': 30, ...)."""
  tree = config if isinstance(config, dict) else json.loads(config.to_json_best_effort())
  return {key: value for key, value in sorted(_flatten(tree).items())
          if key not in _TRAINING_NEUTRAL_FIELDS
          and not key.startswith(_TRAINING_NEUTRAL_SECTIONS)}


def config_fingerprint(config) -> str:
  """Of a config (ConfigDict or plain dict) over its training fields."""
  text = json.dumps(training_fields(config), sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:FINGERPRINT_DIGITS]
