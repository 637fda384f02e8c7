"""PyTorch twins of clead_jax's backbones, computing exactly what the Flax models compute (eval
mode), for models exported with `python -m clead_jax.export`. This file imports only torch, so it
can travel beside an exported checkpoint (the export command copies it there).

Parameter names follow RobustBench's architectures (robustbench/model_zoo/architectures) where
those exist, so one state_dict loads with strict=True into both:
  resnet18         ~ robustbench resnet.ResNet18() (3-channel input, width 64);
  preact_resnet18  ~ robustbench resnet.PreActResNet(PreActBlock, [2, 2, 2, 2], bn_before_fc=True,
                     out_shortcut=True): our pre-activation network ends with BN + ReLU before the
                     classifier and its projection shortcut reads the pre-activated input; the
                     default PreActResNet18() does neither, so it computes another function;
  wide_resnet      ~ robustbench wide_resnet.WideResNet(depth, num_classes, widen_factor) (3-channel
                     input; any depth and width).
RobustBench's classes pool with a fixed window (4 or 8), which equals our global mean pooling on
32x32 inputs only; the modules here pool globally, for any image size. small_cnn and mnist_cnn
have no RobustBench counterpart.

Every model takes inputs in [0, 1], NCHW, and `Normalized` puts the dataset normalisation inside
the model, as RobustBench expects.
"""

import torch
from torch import nn
import torch.nn.functional as F


class Normalized(nn.Module):
  """(x - mean) / std, then the model: inputs in [0, 1]."""

  def __init__(self, model, mean, std):
    super().__init__()
    self.model = model
    self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
    self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

  def forward(self, x):
    return self.model((x - self.mean) / self.std)


def _flatten_nhwc(x):
  """Flatten in Flax's (H, W, C) order, so that dense kernels need no reordering."""
  return x.permute(0, 2, 3, 1).flatten(1)


class SmallCNN(nn.Module):
  """clead_jax.models.SmallCNN: two 3x3 conv + BN + ReLU, a 2x2 max-pool, dense + BN + ReLU, dense."""

  def __init__(self, in_channels, num_classes, width, image_size):
    super().__init__()
    self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(2 * width)
    pooled = (image_size[0] // 2) * (image_size[1] // 2) * 2 * width
    self.fc1 = nn.Linear(pooled, 4 * width, bias=False)
    self.bn3 = nn.BatchNorm1d(4 * width)
    self.fc2 = nn.Linear(4 * width, num_classes)

  def forward(self, x):
    x = F.relu(self.bn1(self.conv1(x)))
    x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
    return self.fc2(F.relu(self.bn3(self.fc1(_flatten_nhwc(x)))))


class MnistCNN(nn.Module):
  """clead_jax.models.MnistCNN (TRADES' SmallCNN without dropout)."""

  def __init__(self, in_channels, num_classes, width, image_size):
    super().__init__()
    dense = max(1, round(200 * width / 32))
    self.conv1 = nn.Conv2d(in_channels, width, 3)
    self.conv2 = nn.Conv2d(width, width, 3)
    self.conv3 = nn.Conv2d(width, 2 * width, 3)
    self.conv4 = nn.Conv2d(2 * width, 2 * width, 3)
    side_h = ((image_size[0] - 4) // 2 - 4) // 2
    side_w = ((image_size[1] - 4) // 2 - 4) // 2
    self.fc1 = nn.Linear(side_h * side_w * 2 * width, dense)
    self.fc2 = nn.Linear(dense, dense)
    self.fc3 = nn.Linear(dense, num_classes)

  def forward(self, x):
    x = F.relu(self.conv2(F.relu(self.conv1(x))))
    x = F.max_pool2d(x, 2)
    x = F.relu(self.conv4(F.relu(self.conv3(x))))
    x = F.max_pool2d(x, 2)
    return self.fc3(F.relu(self.fc2(F.relu(self.fc1(_flatten_nhwc(x))))))


class BasicBlock(nn.Module):
  """Post-activation ResNet block (robustbench resnet.BasicBlock)."""

  def __init__(self, in_planes, planes, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.shortcut = nn.Sequential()
    if stride != 1 or in_planes != planes:
      self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                    nn.BatchNorm2d(planes))

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class PreActBlock(nn.Module):
  """Pre-activation block whose projection shortcut reads relu(bn1(x)) (robustbench
  resnet.PreActBlock with out_shortcut=True)."""

  def __init__(self, in_planes, planes, stride):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(in_planes)
    self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
    if stride != 1 or in_planes != planes:
      self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False))

  def forward(self, x):
    out = F.relu(self.bn1(x))
    shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
    return self.conv2(F.relu(self.bn2(self.conv1(out)))) + shortcut


class ResNet18(nn.Module):
  """clead_jax.models ResNet-18 (post- or pre-activation), CIFAR stem, global mean pooling."""

  def __init__(self, in_channels, num_classes, width, preact=False):
    super().__init__()
    self.preact = preact
    self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
    if not preact:
      self.bn1 = nn.BatchNorm2d(width)
    block = PreActBlock if preact else BasicBlock
    planes = width
    for stage in range(4):
      blocks = []
      for index in range(2):
        out = width * 2 ** stage
        blocks.append(block(planes, out, 2 if stage > 0 and index == 0 else 1))
        planes = out
      setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
    if preact:
      self.bn = nn.BatchNorm2d(planes)
    self.linear = nn.Linear(planes, num_classes)

  def forward(self, x):
    x = self.conv1(x)
    if not self.preact:
      x = F.relu(self.bn1(x))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    if self.preact:
      x = F.relu(self.bn(x))
    return self.linear(x.mean((2, 3)))


class WideBlock(nn.Module):
  """robustbench wide_resnet.BasicBlock (dropout 0)."""

  def __init__(self, in_planes, out_planes, stride):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(in_planes)
    self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(out_planes)
    self.conv2 = nn.Conv2d(out_planes, out_planes, 3, padding=1, bias=False)
    self.equal_in_out = in_planes == out_planes and stride == 1
    if not self.equal_in_out:
      self.convShortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)  # pylint: disable=invalid-name

  def forward(self, x):
    out = F.relu(self.bn1(x))
    shortcut = x if self.equal_in_out else self.convShortcut(out)
    return self.conv2(F.relu(self.bn2(self.conv1(out)))) + shortcut


class WideStage(nn.Module):
  def __init__(self, blocks, in_planes, out_planes, stride):
    super().__init__()
    self.layer = nn.Sequential(*[WideBlock(in_planes if i == 0 else out_planes, out_planes,
                                           stride if i == 0 else 1) for i in range(blocks)])

  def forward(self, x):
    return self.layer(x)


class WideResNet(nn.Module):
  """clead_jax.models.WideResNet-depth-widen, global mean pooling."""

  def __init__(self, in_channels, num_classes, depth, widen):
    super().__init__()
    blocks = (depth - 4) // 6
    channels = [16, 16 * widen, 32 * widen, 64 * widen]
    self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
    self.block1 = WideStage(blocks, channels[0], channels[1], 1)
    self.block2 = WideStage(blocks, channels[1], channels[2], 2)
    self.block3 = WideStage(blocks, channels[2], channels[3], 2)
    self.bn1 = nn.BatchNorm2d(channels[3])
    self.fc = nn.Linear(channels[3], num_classes)

  def forward(self, x):
    x = self.block3(self.block2(self.block1(self.conv1(x))))
    return self.fc(F.relu(self.bn1(x)).mean((2, 3)))


def build(architecture):
  """The module of an exported checkpoint's 'architecture' entry: {'name': ..., **arguments}."""
  arguments = {k: v for k, v in architecture.items() if k != "name"}
  name = architecture["name"]
  if name == "small_cnn":
    return SmallCNN(**arguments)
  if name == "mnist_cnn":
    return MnistCNN(**arguments)
  if name == "resnet18":
    return ResNet18(**arguments)
  if name == "preact_resnet18":
    return ResNet18(preact=True, **arguments)
  if name == "wide_resnet":
    return WideResNet(**arguments)
  raise ValueError(f"unknown architecture {name!r}")
