"""Linen models: backbones that return (logits, features), and the network used for training.

Every backbone normalises its input first, so attacks work in [0, 1] pixel space and epsilon
means what the config says. `Network` adds the projection head whose L2-normalised output feeds
the contrastive loss.
"""

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from clead_jax.errors import UserError

ModuleDef = Any


def _normalise(x, mean, std):
  return (x - jnp.asarray(mean, x.dtype)) / jnp.asarray(std, x.dtype)


class SmallCNN(nn.Module):
  """Two conv blocks and a dense layer: the digits model (8x8 inputs)."""
  num_classes: int
  mean: Sequence[float]
  std: Sequence[float]
  width: int = 32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    x = _normalise(x, self.mean, self.std).astype(self.dtype)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                             dtype=self.dtype, param_dtype=jnp.float32)
    x = nn.Conv(self.width, (3, 3), use_bias=False, dtype=self.dtype)(x)
    x = nn.relu(norm()(x))
    x = nn.Conv(2 * self.width, (3, 3), use_bias=False, dtype=self.dtype)(x)
    x = nn.relu(norm()(x))
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    features = nn.relu(norm()(nn.Dense(4 * self.width, use_bias=False, dtype=self.dtype)(x)))
    logits = nn.Dense(self.num_classes, dtype=self.dtype)(features)
    return logits.astype(jnp.float32), features.astype(jnp.float32)


class BasicBlock(nn.Module):
  """ResNet basic block (post-activation)."""
  filters: int
  strides: int
  norm: ModuleDef
  dtype: Any

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype)
    y = conv(self.filters, (3, 3), (self.strides, self.strides), padding=1)(x)
    y = nn.relu(self.norm()(y))
    y = conv(self.filters, (3, 3), padding=1)(y)
    y = self.norm()(y)
    if x.shape != y.shape:
      x = self.norm()(conv(self.filters, (1, 1), (self.strides, self.strides))(x))
    return nn.relu(x + y)


class PreActBlock(nn.Module):
  """Pre-activation basic block (He et al. 2016b); also the WideResNet block."""
  filters: int
  strides: int
  norm: ModuleDef
  dtype: Any

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype)
    out = nn.relu(self.norm()(x))
    needs_projection = x.shape[-1] != self.filters or self.strides != 1
    shortcut = x
    if needs_projection:
      shortcut = conv(self.filters, (1, 1), (self.strides, self.strides))(out)
    y = conv(self.filters, (3, 3), (self.strides, self.strides), padding=1)(out)
    y = conv(self.filters, (3, 3), padding=1)(nn.relu(self.norm()(y)))
    return y + shortcut


class ResNet(nn.Module):
  """CIFAR-style ResNet: 3x3 stem, no max-pool, four stages."""
  block: ModuleDef
  stage_sizes: Sequence[int]
  num_classes: int
  mean: Sequence[float]
  std: Sequence[float]
  width: int = 64
  preact: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    x = _normalise(x, self.mean, self.std).astype(self.dtype)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                             epsilon=1e-5, dtype=self.dtype, param_dtype=jnp.float32)
    x = nn.Conv(self.width, (3, 3), padding=1, use_bias=False, dtype=self.dtype)(x)
    if not self.preact:
      x = nn.relu(norm()(x))
    for stage, num_blocks in enumerate(self.stage_sizes):
      for index in range(num_blocks):
        strides = 2 if stage > 0 and index == 0 else 1
        x = self.block(self.width * 2**stage, strides, norm, self.dtype)(x)
    if self.preact:
      x = nn.relu(norm()(x))
    features = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(self.num_classes, dtype=self.dtype)(features)
    return logits.astype(jnp.float32), features.astype(jnp.float32)


class WideResNet(nn.Module):
  """WideResNet-depth-widen (Zagoruyko & Komodakis 2016), pre-activation blocks."""
  depth: int
  widen: int
  num_classes: int
  mean: Sequence[float]
  std: Sequence[float]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    blocks_per_stage = (self.depth - 4) // 6
    x = _normalise(x, self.mean, self.std).astype(self.dtype)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                             epsilon=1e-5, dtype=self.dtype, param_dtype=jnp.float32)
    x = nn.Conv(16, (3, 3), padding=1, use_bias=False, dtype=self.dtype)(x)
    for stage, filters in enumerate((16 * self.widen, 32 * self.widen, 64 * self.widen)):
      for index in range(blocks_per_stage):
        strides = 2 if stage > 0 and index == 0 else 1
        x = PreActBlock(filters, strides, norm, self.dtype)(x)
    x = nn.relu(norm()(x))
    features = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(self.num_classes, dtype=self.dtype)(features)
    return logits.astype(jnp.float32), features.astype(jnp.float32)


class ProjectionHead(nn.Module):
  """Two-layer MLP, then L2 normalisation: the embedding the contrastive loss sees."""
  hidden_dim: int
  projection_dim: int

  @nn.compact
  def __call__(self, features):
    h = nn.relu(nn.Dense(self.hidden_dim)(features))
    z = nn.Dense(self.projection_dim)(h)
    return z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)


class Network(nn.Module):
  """Backbone plus projection head: returns (logits, embedding)."""
  backbone: nn.Module
  projection_dim: int = 128

  @nn.compact
  def __call__(self, x, train: bool = False):
    logits, features = self.backbone(x, train=train)
    embedding = ProjectionHead(features.shape[-1], self.projection_dim)(features)
    return logits, embedding


def _resnet18(**kw):
  return ResNet(block=BasicBlock, stage_sizes=(2, 2, 2, 2), **kw)


def _preact_resnet18(**kw):
  return ResNet(block=PreActBlock, stage_sizes=(2, 2, 2, 2), preact=True, **kw)


def _wide_resnet(depth, widen, **kw):
  return WideResNet(depth=depth, widen=widen, **kw)


# The model registry: config.model.name -> builder(model_config, common kwargs).
MODELS: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": lambda mc, **kw: SmallCNN(width=mc.width, **kw),
    "resnet18": lambda mc, **kw: _resnet18(width=mc.width, **kw),
    "preact_resnet18": lambda mc, **kw: _preact_resnet18(width=mc.width, **kw),
    "wide_resnet": lambda mc, **kw: _wide_resnet(mc.depth, mc.widen, **kw),
}


def build_network(model_config, num_classes, mean, std) -> Network:
  """Builds the Network named by config.model.name."""
  if model_config.name not in MODELS:
    raise UserError(f"config.model.name={model_config.name!r} is unknown; "
                    f"choose one of {sorted(MODELS)}")
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[model_config.get("dtype", "float32")]
  backbone = MODELS[model_config.name](model_config, num_classes=num_classes, mean=tuple(mean),
                                       std=tuple(std), dtype=dtype)
  return Network(backbone=backbone, projection_dim=model_config.projection_dim)
