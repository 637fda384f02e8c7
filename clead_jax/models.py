"""Linen models: backbones that return (logits, features), and the network used for training.

Every backbone normalises its input first, so attacks work in [0, 1] pixel space and epsilon
means what the config says. `Network` adds the projection head whose L2-normalised output feeds
the contrastive loss.

Convolutions are NHWC x HWIO, and on CPU `conv2d` writes out its own gradients. XLA:CPU runs a
convolution fast (Eigen or YNNPACK) only in that canonical form and canonicalises top-level
convolutions only, so inside the PGD fori_loop the input gradient autodiff makes (an HWOI kernel)
ran as a naive loop nest, 5-10x slower than unrolled; and its form of the kernel gradient (a
window as large as the image) ran at ~2 GFLOP/s even at the top level. See BENCHMARKS.md.
"""

import contextlib
import functools
import threading
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from clead_jax.errors import UserError

ModuleDef = Any


def _normalise(x, mean, std):
  return (x - jnp.asarray(mean, x.dtype)) / jnp.asarray(std, x.dtype)


# --- convolution --------------------------------------------------------------------------------

_NHWC = ("NHWC", "HWIO", "NHWC")


def _conv(x, kernel, strides, padding, lhs_dilation=None):
  return lax.conv_general_dilated(x, kernel, strides, padding, lhs_dilation=lhs_dilation,
                                  dimension_numbers=_NHWC)


def conv2d(x, kernel, strides, padding):
  """NHWC x HWIO convolution; `padding` is ((top, bottom), (left, right)). The values and
  gradients of lax.conv_general_dilated; on CPU the gradients are computed by _cpu_conv2d's rule,
  elsewhere (cuDNN, ...) by autodiff's."""
  return lax.platform_dependent(x, kernel, cpu=lambda x, k: _cpu_conv2d(x, k, strides, padding),
                                default=lambda x, k: _conv(x, k, strides, padding))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _cpu_conv2d(x, kernel, strides, padding):
  return _conv(x, kernel, strides, padding)


def _conv2d_fwd(x, kernel, strides, padding):
  return _conv(x, kernel, strides, padding), (x, kernel)


def _chunk_size(batch, bytes_per_example, budget=8 << 20):
  """The largest divisor of `batch` whose examples' patches fit in `budget` bytes (at least 1)."""
  fitting = [d for d in range(1, batch + 1) if batch % d == 0 and d * bytes_per_example <= budget]
  return max(fitting, default=1)


def _kernel_grad(x, dy, kernel_shape, strides, padding):
  """sum over examples and positions of patch (x) outer dy: im2col matmuls over chunks of
  examples, so that each chunk's patches stay in cache. XLA:CPU's own form of this convolution
  (a window the size of the image over transposed activations) ran at ~2 GFLOP/s."""
  kh, kw, cin, cout = kernel_shape
  batch, out_h, out_w, _ = dy.shape
  (top, bottom), (left, right) = padding
  xp = lax.pad(x, jnp.zeros((), x.dtype),
               ((0, 0, 0), (top, bottom, 0), (left, right, 0), (0, 0, 0)))
  chunk = _chunk_size(batch, out_h * out_w * kh * kw * cin * x.dtype.itemsize)
  xs = xp.reshape((batch // chunk, chunk) + xp.shape[1:])
  dys = dy.reshape(batch // chunk, chunk * out_h * out_w, cout)

  def add_chunk(total, chunk_arrays):
    x_chunk, dy_chunk = chunk_arrays
    taps = [lax.slice(x_chunk, (0, i, j, 0),
                      (chunk, i + (out_h - 1) * strides[0] + 1, j + (out_w - 1) * strides[1] + 1,
                       cin), (1, strides[0], strides[1], 1))
            for i in range(kh) for j in range(kw)]
    patches = jnp.concatenate(taps, axis=-1).reshape(chunk * out_h * out_w, kh * kw * cin)
    return total + lax.dot_general(dy_chunk, patches, (((0,), (0,)), ((), ())),
                                   preferred_element_type=jnp.float32), None

  total, _ = lax.scan(add_chunk, jnp.zeros((cout, kh * kw * cin), jnp.float32), (xs, dys))
  return total.T.reshape(kernel_shape)


def _conv2d_bwd(strides, padding, residuals, dy):
  x, kernel = residuals
  # The input gradient: dy, dilated by the strides, convolved with the flipped kernel whose in and
  # out channels are swapped (still HWIO), padded as JAX's own transpose rule pads it.
  pads = []
  for size, out, k, stride, (low, _) in zip(x.shape[1:3], dy.shape[1:3], kernel.shape[:2],
                                            strides, padding):
    before = k - low - 1
    pads.append((before, size + k - 1 - ((out - 1) * stride + 1) - before))
  flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
  dx = _conv(dy, flipped, (1, 1), pads, lhs_dilation=strides)
  dkernel = _kernel_grad(x, dy, kernel.shape, strides, padding).astype(kernel.dtype)
  return dx, dkernel


_cpu_conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


_EVALUATION_POOLING = threading.local()


@contextlib.contextmanager
def evaluation_pooling():
  """While a function is traced under it, the networks' 2x2 max pooling is max_pool_2x2 (on CPU a
  max over the window's taps; same values and gradients as nn.max_pool). Evaluation traces its
  attacks so (evaluation/suite.py); training keeps nn.max_pool: in a train step the other form
  let XLA fuse the neighbouring BatchNorm differently, which moved the last bits of the
  quickstart's weights, and long PGD training amplifies such bits into other numbers."""
  before = getattr(_EVALUATION_POOLING, "on", False)
  _EVALUATION_POOLING.on = True
  try:
    yield
  finally:
    _EVALUATION_POOLING.on = before


def pool_2x2(x):
  """The networks' 2x2 max pooling, stride 2: max_pool_2x2 under evaluation_pooling(), else
  nn.max_pool."""
  if getattr(_EVALUATION_POOLING, "on", False):
    return max_pool_2x2(x)
  return nn.max_pool(x, (2, 2), strides=(2, 2))


def max_pool_2x2(x):
  """nn.max_pool(x, (2, 2), strides=(2, 2)) (VALID), with the same values and gradients; on CPU
  computed by _cpu_max_pool_2x2, elsewhere by nn.max_pool."""
  return lax.platform_dependent(x, cpu=_cpu_max_pool_2x2,
                                default=lambda x: nn.max_pool(x, (2, 2), strides=(2, 2)))


def _pool_taps(x):
  """The four taps of every 2x2 window, in XLA's window order (row-major), of NHWC x cut to even
  height and width (VALID pooling drops an odd last row or column)."""
  batch, height, width, channels = x.shape
  windows = x[:, :height // 2 * 2, :width // 2 * 2].reshape(
      batch, height // 2, 2, width // 2, 2, channels)
  return [windows[:, :, i, :, j] for i in (0, 1) for j in (0, 1)]


@jax.custom_vjp
def _cpu_max_pool_2x2(x):
  """2x2 max pooling as a max over the four taps. XLA:CPU's reduce_window and its gradient,
  select_and_scatter, took about a third of the digits model's input gradient (2 ms and 0.6 ms
  of ~9 ms for 240 images); the taps are element-wise work that XLA fuses."""
  taps = _pool_taps(x)
  return jnp.maximum(jnp.maximum(taps[0], taps[1]), jnp.maximum(taps[2], taps[3]))


def _max_pool_fwd(x):
  return _cpu_max_pool_2x2(x), x


def _max_pool_bwd(x, dy):
  # nn.max_pool's gradient (select_and_scatter with >=): each window's gradient goes to its
  # first maximum in window order, never split between ties (ReLU plateaus make ties common).
  taps = _pool_taps(x)
  pooled = jnp.maximum(jnp.maximum(taps[0], taps[1]), jnp.maximum(taps[2], taps[3]))
  taken = jnp.zeros(dy.shape, bool)
  grads = []
  for index, tap in enumerate(taps):
    chosen = ~taken & (tap == pooled) if index < 3 else ~taken
    grads.append(jnp.where(chosen, dy, jnp.zeros((), dy.dtype)))
    taken = taken | chosen
  batch, height, width, channels = x.shape
  windows = jnp.stack([jnp.stack(grads[0:2], 3), jnp.stack(grads[2:4], 3)], 2)
  dx = windows.reshape(batch, height // 2 * 2, width // 2 * 2, channels)
  return (jnp.pad(dx, ((0, 0), (0, height % 2), (0, width % 2), (0, 0))),)


_cpu_max_pool_2x2.defvjp(_max_pool_fwd, _max_pool_bwd)


class Conv(nn.Module):
  """A 2-D convolution with nn.Conv's parameters ('kernel' HWIO, 'bias'), names and init, built
  on conv2d. padding: 'SAME', 'VALID' or an int for every side."""
  features: int
  kernel_size: Sequence[int]
  strides: Sequence[int] = (1, 1)
  padding: Any = "SAME"
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x):
    kernel_size, strides = tuple(self.kernel_size), tuple(self.strides)
    kernel = self.param("kernel", self.kernel_init, kernel_size + (x.shape[-1], self.features),
                        self.param_dtype)
    bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) \
        if self.use_bias else None
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    if isinstance(self.padding, str):
      padding = lax.padtype_to_pads(x.shape[1:3], kernel_size, strides, self.padding)
    else:
      padding = ((self.padding, self.padding),) * 2
    y = conv2d(x, kernel, strides, tuple(tuple(int(p) for p in pad) for pad in padding))
    return y if bias is None else y + bias


class SmallCNN(nn.Module):
  """Two conv blocks (BatchNorm) and a dense layer: the digits model (8x8 inputs)."""
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
    x = Conv(self.width, (3, 3), use_bias=False, dtype=self.dtype)(x)
    x = nn.relu(norm()(x))
    x = Conv(2 * self.width, (3, 3), use_bias=False, dtype=self.dtype)(x)
    x = nn.relu(norm()(x))
    x = pool_2x2(x)
    x = x.reshape((x.shape[0], -1))
    features = nn.relu(norm()(nn.Dense(4 * self.width, use_bias=False, dtype=self.dtype)(x)))
    logits = nn.Dense(self.num_classes, dtype=self.dtype)(features)
    return logits.astype(jnp.float32), features.astype(jnp.float32)


class MnistCNN(nn.Module):
  """TRADES' SmallCNN for 28x28 MNIST-family images (Zhang et al. 2019, models/small_cnn.py):
  3x3 convolutions of w, w, 2w, 2w channels (unpadded, with bias, ReLU), a 2x2 max-pool after
  the second and the fourth, then dense layers of d and d units and the classifier; w = width
  (32 in the paper) and d = 200 w / 32. No BatchNorm, as in the paper; its dropout (0.5 after the
  first dense layer) is left out, so that the network is deterministic in training too."""
  num_classes: int
  mean: Sequence[float]
  std: Sequence[float]
  width: int = 32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    del train  # no BatchNorm, no dropout
    x = _normalise(x, self.mean, self.std).astype(self.dtype)
    conv = functools.partial(Conv, kernel_size=(3, 3), padding="VALID", dtype=self.dtype)
    for features in (self.width, self.width):
      x = nn.relu(conv(features)(x))
    x = pool_2x2(x)
    for features in (2 * self.width, 2 * self.width):
      x = nn.relu(conv(features)(x))
    x = pool_2x2(x)
    x = x.reshape((x.shape[0], -1))
    dense = max(1, round(200 * self.width / 32))
    x = nn.relu(nn.Dense(dense, dtype=self.dtype)(x))
    features = nn.relu(nn.Dense(dense, dtype=self.dtype)(x))
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
    conv = functools.partial(Conv, use_bias=False, dtype=self.dtype)
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
    conv = functools.partial(Conv, use_bias=False, dtype=self.dtype)
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
    x = Conv(self.width, (3, 3), padding=1, use_bias=False, dtype=self.dtype)(x)
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
    x = Conv(16, (3, 3), padding=1, use_bias=False, dtype=self.dtype)(x)
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
    "mnist_cnn": lambda mc, **kw: MnistCNN(width=mc.width, **kw),
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


def in_float32(network: Network) -> Network:
  """The same network computing in float32 (evaluation: attack gradients in bfloat16 are too
  coarse to trust). Parameters are float32 in either case, so the variables fit both. Anything
  that is not a Network (a test's linear model) is returned as it is."""
  backbone = getattr(network, "backbone", None)
  if backbone is None or getattr(backbone, "dtype", jnp.float32) == jnp.float32:
    return network
  return network.clone(backbone=network.backbone.clone(dtype=jnp.float32))
