"""Weights between our Flax backbones and PyTorch, both ways, and the exported file's contents.

to_torch / from_torch map every tensor of a registry backbone to the names of the module in
torch_models.py (RobustBench's names where RobustBench has the architecture) and back; the
projection head travels beside the classifier. unwrap_state_dict reads RobustBench's checkpoint
conventions. export_state writes what `python -m clead_jax.export` writes (see export.py).
PyTorch is an optional extra (pip install -e '.[torch]'); it is imported only inside functions.
"""

import os
import shutil

import numpy as np

from clead_jax import provenance
from clead_jax.errors import UserError

FORMAT = "clead_jax-torch-1"
# RobustBench's checkpoint conventions: nested state dicts, wrappers' name prefixes.
_NESTING_KEYS = ("state_dict", "model_state_dict", "model", "net")
_PREFIXES = ("module.", "model.")


# --- the name map ----------------------------------------------------------------------------------

def _bn(torch_name, flax_path):
  return [(torch_name, flax_path, "bn")]


def _preact_block(torch_block, block, params, shortcut):
  """models.PreActBlock: BatchNorm_0, the projection Conv_0 (when there is one: it is created
  first), the two 3x3 convolutions and BatchNorm_1."""
  projection = "Conv_2" in params[block]
  first = 1 if projection else 0
  return (_bn(f"{torch_block}.bn1", (block, "BatchNorm_0"))
          + ([(f"{torch_block}.{shortcut}", (block, "Conv_0"), "conv")] if projection else [])
          + [(f"{torch_block}.conv1", (block, f"Conv_{first}"), "conv")]
          + _bn(f"{torch_block}.bn2", (block, "BatchNorm_1"))
          + [(f"{torch_block}.conv2", (block, f"Conv_{first + 1}"), "conv")])


def _layers(model_config, params):
  """[(torch name, Flax path under the backbone, kind)] for the model, in module order. kind:
  conv (HWIO <-> OIHW), dense ((in, out) <-> (out, in)), bn (scale/bias and the statistics)."""
  name = model_config.name
  if name == "small_cnn":
    return ([("conv1", ("Conv_0",), "conv")] + _bn("bn1", ("BatchNorm_0",))
            + [("conv2", ("Conv_1",), "conv")] + _bn("bn2", ("BatchNorm_1",))
            + [("fc1", ("Dense_0",), "dense")] + _bn("bn3", ("BatchNorm_2",))
            + [("fc2", ("Dense_1",), "dense")])
  if name == "mnist_cnn":
    return ([(f"conv{i + 1}", (f"Conv_{i}",), "conv") for i in range(4)]
            + [(f"fc{i + 1}", (f"Dense_{i}",), "dense") for i in range(3)])
  if name in ("resnet18", "preact_resnet18"):
    preact = name == "preact_resnet18"
    layers = [("conv1", ("Conv_0",), "conv")] + ([] if preact else _bn("bn1", ("BatchNorm_0",)))
    for index in range(8):
      torch_block = f"layer{index // 2 + 1}.{index % 2}"
      if preact:
        layers += _preact_block(torch_block, f"PreActBlock_{index}", params, "shortcut.0")
      else:
        block = f"BasicBlock_{index}"
        layers += ([(f"{torch_block}.conv1", (block, "Conv_0"), "conv")]
                   + _bn(f"{torch_block}.bn1", (block, "BatchNorm_0"))
                   + [(f"{torch_block}.conv2", (block, "Conv_1"), "conv")]
                   + _bn(f"{torch_block}.bn2", (block, "BatchNorm_1")))
        if "Conv_2" in params[block]:
          layers += ([(f"{torch_block}.shortcut.0", (block, "Conv_2"), "conv")]
                     + _bn(f"{torch_block}.shortcut.1", (block, "BatchNorm_2")))
    if preact:
      layers += _bn("bn", ("BatchNorm_0",))
    return layers + [("linear", ("Dense_0",), "dense")]
  if name == "wide_resnet":
    blocks = (model_config.depth - 4) // 6
    layers = [("conv1", ("Conv_0",), "conv")]
    for index in range(3 * blocks):
      torch_block = f"block{index // blocks + 1}.layer.{index % blocks}"
      layers += _preact_block(torch_block, f"PreActBlock_{index}", params, "convShortcut")
    return layers + _bn("bn1", ("BatchNorm_0",)) + [("fc", ("Dense_0",), "dense")]
  raise UserError(f"config.model.name={name!r} has no PyTorch export")


def _get(tree, path):
  for part in path:
    tree = tree[part]
  return tree


def _to_torch_array(flax_array, kind):
  a = np.asarray(flax_array, np.float32)
  if kind == "conv":
    return a.transpose(3, 2, 0, 1)  # HWIO -> OIHW
  if kind == "dense":
    return a.T  # (in, out) -> (out, in)
  return a


def _to_flax_array(torch_array, kind):
  a = np.asarray(torch_array, np.float32)
  if kind == "conv":
    return a.transpose(2, 3, 1, 0)
  if kind == "dense":
    return a.T
  return a


def _entries(layers, params):
  """[(torch key, Flax collection, Flax path, kind)] for every tensor."""
  entries = []
  for torch_name, path, kind in layers:
    if kind == "bn":
      entries += [(f"{torch_name}.weight", "params", path + ("scale",), "vector"),
                  (f"{torch_name}.bias", "params", path + ("bias",), "vector"),
                  (f"{torch_name}.running_mean", "batch_stats", path + ("mean",), "vector"),
                  (f"{torch_name}.running_var", "batch_stats", path + ("var",), "vector")]
    else:
      entries.append((f"{torch_name}.weight", "params", path + ("kernel",), kind))
      if "bias" in _get(params, path):
        entries.append((f"{torch_name}.bias", "params", path + ("bias",), "vector"))
  return entries


def to_torch(model_config, variables):
  """(state_dict of numpy arrays, projection head of numpy arrays) of Flax `variables`."""
  backbone = {"params": variables["params"]["backbone"],
              "batch_stats": variables.get("batch_stats", {}).get("backbone", {})}
  layers = _layers(model_config, backbone["params"])
  state = {}
  for key, collection, path, kind in _entries(layers, backbone["params"]):
    state[key] = _to_torch_array(_get(backbone[collection], path), kind)
  for torch_name, _, kind in layers:
    if kind == "bn":
      state[f"{torch_name}.num_batches_tracked"] = np.zeros((), np.int64)
  head = {f"{layer}.{leaf}": np.asarray(value) for layer, leaves in
          variables["params"]["ProjectionHead_0"].items() for leaf, value in leaves.items()}
  return state, head


def unwrap_state_dict(checkpoint):
  """The state dict inside a PyTorch checkpoint (RobustBench's conventions: nested under
  'state_dict' and the like, names prefixed by 'module.' or 'model.' wrappers)."""
  state = checkpoint
  while isinstance(state, dict) and not any(hasattr(v, "shape") for v in state.values()):
    inner = next((state[k] for k in _NESTING_KEYS if k in state and isinstance(state[k], dict)),
                 None)
    if inner is None:
      break
    state = inner
  if not isinstance(state, dict):
    raise UserError("the PyTorch checkpoint holds no state dict (a dict of tensors, possibly "
                    f"under one of {list(_NESTING_KEYS)})")
  state = {k: v for k, v in state.items() if hasattr(v, "shape")}
  changed = True
  while changed:
    changed = False
    for prefix in _PREFIXES:
      if state and all(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items()}
        changed = True
  return {k: v for k, v in state.items() if k not in ("mean", "std")}


def from_torch(model_config, state, abstract_variables, source="the PyTorch checkpoint",
               head=None):
  """Flax variables (numpy) of `state` for the model of `abstract_variables` (shapes only).

  The projection head comes from `head` (an export's) when its shapes fit, else it is zero: it
  does not affect the logits.
  A missing, unexpected or wrongly shaped tensor is one UserError naming the first one.
  """
  params = abstract_variables["params"]["backbone"]
  entries = _entries(_layers(model_config, params), params)
  expected = {key for key, *_ in entries}
  tracked = {k for k in state if k.endswith("num_batches_tracked")}
  for key, collection, path, kind in entries:
    if key not in state:
      raise UserError(f"{source}: tensor {key!r} is missing; the model (config.model.name="
                      f"{model_config.name!r} and its config.model fields) needs it")
  unexpected = sorted(set(state) - expected - tracked)
  if unexpected:
    raise UserError(f"{source}: tensor {unexpected[0]!r} is not part of config.model.name="
                    f"{model_config.name!r} ({len(unexpected)} such tensor(s)); choose the "
                    "architecture (and depth, width) the checkpoint was trained with")
  out = {"params": {"backbone": {}}, "batch_stats": {"backbone": {}}}
  for key, collection, path, kind in entries:
    want = _get(abstract_variables[collection]["backbone"], path).shape
    value = _to_flax_array(np.asarray(state[key]), kind)
    if value.shape != tuple(want):
      raise UserError(f"{source}: tensor {key!r} has shape {tuple(np.asarray(state[key]).shape)}, "
                      f"but config.model (name={model_config.name!r}) needs "
                      f"{tuple(_to_torch_array(np.zeros(want), kind).shape)}; choose the "
                      "architecture, width and classes the checkpoint was trained with")
    node = out[collection]["backbone"]
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = value
  head_abstract = abstract_variables["params"]["ProjectionHead_0"]
  fits = head is not None and all(
      f"{layer}.{leaf}" in head and np.shape(head[f"{layer}.{leaf}"]) == tuple(a.shape)
      for layer, leaves in head_abstract.items() for leaf, a in leaves.items())
  out["params"]["ProjectionHead_0"] = {  # another projection_dim: zeros (logits do not use it)
      layer: {leaf: (np.asarray(head[f"{layer}.{leaf}"], np.float32) if fits
                     else np.zeros(a.shape, np.float32)) for leaf, a in leaves.items()}
      for layer, leaves in head_abstract.items()}
  if not out["batch_stats"]["backbone"]:
    out["batch_stats"] = {}
  return out


# --- architectures -----------------------------------------------------------------------------------

def architecture(model_config, image_shape, num_classes):
  """torch_models.build's argument for a config's model."""
  channels = int(image_shape[-1])
  name = model_config.name
  if name in ("small_cnn", "mnist_cnn"):
    return {"name": name, "in_channels": channels, "num_classes": num_classes,
            "width": int(model_config.width), "image_size": [int(image_shape[0]),
                                                             int(image_shape[1])]}
  if name in ("resnet18", "preact_resnet18"):
    return {"name": name, "in_channels": channels, "num_classes": num_classes,
            "width": int(model_config.width)}
  if name == "wide_resnet":
    return {"name": name, "in_channels": channels, "num_classes": num_classes,
            "depth": int(model_config.depth), "widen": int(model_config.widen)}
  raise UserError(f"config.model.name={name!r} has no PyTorch export")


def robustbench_class(arch, image_shape):
  """{'module', 'class' or 'factory', 'kwargs'} of RobustBench's class that loads the export's
  state_dict with strict=True and computes the same function; or {'none': reason}."""
  name = arch["name"]
  if name in ("small_cnn", "mnist_cnn"):
    return {"none": f"RobustBench defines no {name}; use torch_models.py"}
  if arch["in_channels"] != 3 or tuple(image_shape[:2]) != (32, 32):
    return {"none": "RobustBench's architectures take 3x32x32 inputs (their pooling window is "
                    "fixed); use torch_models.py"}
  if name == "resnet18":
    if arch["width"] != 64:
      return {"none": "RobustBench's ResNet18 has width 64; use torch_models.py"}
    return {"module": "robustbench/model_zoo/architectures/resnet.py", "factory": "ResNet18",
            "kwargs": {}}
  if name == "preact_resnet18":
    if arch["width"] != 64:
      return {"none": "RobustBench's PreActResNet has width 64; use torch_models.py"}
    return {"module": "robustbench/model_zoo/architectures/resnet.py", "class": "PreActResNet",
            "args": ["PreActBlock", [2, 2, 2, 2]],
            "kwargs": {"num_classes": arch["num_classes"], "bn_before_fc": True,
                       "out_shortcut": True},
            "note": "not the default PreActResNet18(): ours has BN + ReLU before the classifier "
                    "and a shortcut from the pre-activated input"}
  return {"module": "robustbench/model_zoo/architectures/wide_resnet.py", "class": "WideResNet",
          "kwargs": {"depth": arch["depth"], "num_classes": arch["num_classes"],
                     "widen_factor": arch["widen"]}}


def torch_module(arch, mean, std, state=None):
  """Normalized(torch_models.build(arch)) in eval mode, with `state` loaded when given."""
  import torch  # pylint: disable=g-import-not-at-top
  from clead_jax import torch_models  # pylint: disable=g-import-not-at-top
  backbone = torch_models.build(arch)
  if state is not None:
    backbone.load_state_dict({k: torch.as_tensor(np.array(v)) for k, v in state.items()},
                             strict=True)
  return torch_models.Normalized(backbone, list(mean), list(std)).eval()


def import_torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise UserError("PyTorch is not installed; pip install -e '.[torch]' (or "
                    "pip install torch) and run again") from None
  return torch


def export_state(config, variables, step, dataset, out_path):
  """Writes out_path (.pt) and the module file beside it; returns the written dict."""
  torch = import_torch()
  arch = architecture(config.model, dataset.image_shape, dataset.num_classes)
  state, head = to_torch(config.model, variables)
  checkpoint = {
      "format": FORMAT,
      "state_dict": {k: torch.from_numpy(np.array(v)) for k, v in state.items()},
      "architecture": arch,
      "robustbench": robustbench_class(arch, dataset.image_shape),
      "mean": [float(m) for m in dataset.mean], "std": [float(s) for s in dataset.std],
      "projection_head": {k: torch.from_numpy(np.array(v)) for k, v in head.items()},
      "clead_jax": {"config": config.to_dict(), "step": int(step), "dataset": dataset.name,
                    "weights_fingerprint": provenance.weights_fingerprint(variables),
                    "config_fingerprint": provenance.config_fingerprint(config)},
  }
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  tmp = out_path + ".tmp"
  torch.save(checkpoint, tmp)
  os.replace(tmp, out_path)
  from clead_jax import torch_models  # pylint: disable=g-import-not-at-top
  shutil.copyfile(torch_models.__file__, os.path.splitext(out_path)[0] + ".py")
  return checkpoint


def load_export(out_path):
  """The exported classifier as a user loads it: FILE.pt with the module of FILE.py beside it
  (not clead_jax's own torch_models), normalisation inside, eval mode."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  torch = import_torch()
  checkpoint = torch.load(out_path, weights_only=False)
  spec = importlib.util.spec_from_file_location("exported_torch_models",
                                                os.path.splitext(out_path)[0] + ".py")
  exported = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(exported)
  backbone = exported.build(checkpoint["architecture"])
  backbone.load_state_dict(checkpoint["state_dict"], strict=True)
  return exported.Normalized(backbone, checkpoint["mean"], checkpoint["std"]).eval()


def compare_export(out_path, network, variables, images, batch_size=250):
  """Runs the exported file (load_export) and our network, in eval mode, on `images` (NHWC,
  float in [0, 1]). Returns {"examples", "same_predictions", "max_abs_diff", "logit_scale"}."""
  import jax  # pylint: disable=g-import-not-at-top
  torch = import_torch()
  module = load_export(out_path)
  ours_fn = jax.jit(lambda v, x: network.apply(v, x, train=False)[0])
  same, max_diff, scale = 0, 0.0, 0.0
  for start in range(0, len(images), batch_size):
    x = np.asarray(images[start:start + batch_size], np.float32)
    ours = np.asarray(ours_fn(variables, x))
    with torch.no_grad():
      theirs = module(torch.as_tensor(x).permute(0, 3, 1, 2).contiguous()).numpy()
    same += int(np.sum(ours.argmax(-1) == theirs.argmax(-1)))
    max_diff = max(max_diff, float(np.max(np.abs(ours - theirs))))
    scale = max(scale, float(np.max(np.abs(ours))))
  return {"examples": len(images), "same_predictions": same, "max_abs_diff": max_diff,
          "logit_scale": scale}
