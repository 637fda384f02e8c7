"""A straightforward PyTorch (eager, NCHW, float32) reference of the C-LEAD train step and of the
PGD evaluation attack, for the benchmark only; nothing else in clead_jax imports torch.

It mirrors clead_jax exactly where cost is concerned: the CIFAR ResNet-18 of models.py (3x3 stem,
post-activation basic blocks, 1x1 projection shortcuts, global mean pool, linear classifier) and
the projection head; input normalisation inside the model; random crop (zero pad 4) and flip;
PGD with a uniform random start, sign steps and projection, BatchNorm in eval mode, gradients
with respect to the input only; one joint train-mode forward of the interleaved clean/adversarial
batch; CE(adv) + CE(clean) + lambda InfoNCE with pair positives; SGD with momentum and weight
decay on every parameter (optax.add_decayed_weights then optax.sgd). With bfloat16, the step runs
under torch.autocast (float32 parameters, bfloat16 compute), as config.model.dtype does in JAX.

Written as a careful PyTorch user writes it for a GPU: channels_last memory format for the model
and the images, cuDNN's benchmark mode (it picks the fastest convolution algorithm per shape), and
optionally the model under torch.compile (`compiled=True`; the 'torch_compile' reference).
"""

import torch
import torch.nn.functional as F
from torch import nn

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)


class BasicBlock(nn.Module):
  def __init__(self, in_planes, planes, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.shortcut = nn.Sequential()
    if stride != 1 or in_planes != planes:
      self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                    nn.BatchNorm2d(planes))

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return F.relu(y + self.shortcut(x))


class ResNet18(nn.Module):
  """CIFAR ResNet-18 plus projection head: forward(x in [0, 1]) -> (logits, embedding)."""

  def __init__(self, width=64, num_classes=10, projection_dim=128, mean=CIFAR10_MEAN,
               std=CIFAR10_STD):
    super().__init__()
    self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
    self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))
    self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    blocks, in_planes = [], width
    for stage in range(4):
      planes = width * 2**stage
      for index in range(2):
        blocks.append(BasicBlock(in_planes, planes, 2 if stage > 0 and index == 0 else 1))
        in_planes = planes
    self.blocks = nn.Sequential(*blocks)
    self.linear = nn.Linear(in_planes, num_classes)
    self.head = nn.Sequential(nn.Linear(in_planes, in_planes), nn.ReLU(),
                              nn.Linear(in_planes, projection_dim))

  def forward(self, x):
    x = (x - self.mean) / self.std
    x = F.relu(self.bn1(self.conv1(x)))
    x = self.blocks(x)
    features = x.mean(dim=(2, 3))
    z = self.head(features)
    return self.linear(features), F.normalize(z, dim=-1, eps=1e-12)


def augment(x, padding=4):
  """Random crop after zero padding and random horizontal flip, per example."""
  n, c, h, w = x.shape
  padded = F.pad(x, (padding, padding, padding, padding))
  arange = lambda k: torch.arange(k, device=x.device)
  rows = torch.randint(0, 2 * padding + 1, (n, 1), device=x.device) + arange(h)
  cols = torch.randint(0, 2 * padding + 1, (n, 1), device=x.device) + arange(w)
  flip = torch.rand(n, 1, device=x.device) < 0.5
  cols = torch.where(flip, cols.flip(1), cols)
  return padded[arange(n)[:, None, None, None], arange(c)[None, :, None, None],
                rows[:, None, :, None], cols[:, None, None, :]]


def pgd(model, x, y, *, epsilon, step_size, steps, keep_misclassified=False):
  """L-inf PGD with a uniform random start on the summed cross-entropy; the model's mode is the
  caller's choice. Gradients are taken with respect to the input only."""
  x_adv = torch.clamp(x + torch.empty_like(x).uniform_(-epsilon, epsilon), 0.0, 1.0)
  x_best, fooled = x_adv.clone(), torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
  for _ in range(steps):
    x_adv.requires_grad_(True)
    logits, _ = model(x_adv)
    loss = F.cross_entropy(logits, y, reduction="sum")
    grad, = torch.autograd.grad(loss, [x_adv])
    x_adv = x_adv.detach()
    if keep_misclassified:
      newly = (logits.argmax(-1) != y) & ~fooled
      x_best = torch.where(newly[:, None, None, None], x_adv, x_best)
      fooled |= newly
    x_adv = x_adv + step_size * grad.sign()
    x_adv = torch.clamp(torch.min(torch.max(x_adv, x - epsilon), x + epsilon), 0.0, 1.0)
  if keep_misclassified:
    x_adv = torch.where(fooled[:, None, None, None], x_best, x_adv)
  return x_adv.detach()


def info_nce_pair(z_clean, z_adv, labels, temperature):
  """InfoNCE with pair positives over the interleaved 2N embeddings (losses.info_nce)."""
  z = torch.stack([z_clean, z_adv], 1).reshape(-1, z_clean.shape[-1])
  similarity = z @ z.T / temperature
  labels2 = labels.repeat_interleave(2)
  index = torch.arange(labels2.shape[0], device=z.device)
  not_self = index[:, None] != index[None, :]
  twin = (index[:, None] // 2 == index[None, :] // 2) & not_self
  denominator = twin | (labels2[:, None] != labels2[None, :])
  log_denominator = torch.logsumexp(similarity.masked_fill(~denominator, float("-inf")), -1)
  log_prob = similarity - log_denominator[:, None]
  return -(log_prob * twin).sum(-1).div(twin.sum(-1).clamp(min=1)).mean()


class CleadStep:
  """One C-LEAD step: PGD (BN eval) -> joint train-mode forward -> loss -> SGD update."""

  def __init__(self, model, *, epsilon, step_size, steps, lam, clean_weight, temperature,
               learning_rate, momentum, weight_decay, augment_images=True, bfloat16=False,
               channels_last=True, compiled=False, compile_backend="inductor"):
    if channels_last:
      model = model.to(memory_format=torch.channels_last)
    if next(model.parameters()).is_cuda:
      torch.backends.cudnn.benchmark = True
    self.channels_last = channels_last
    self.module = model  # its parameters and modes
    self.model = torch.compile(model, backend=compile_backend) if compiled else model
    self.bfloat16 = bfloat16
    self.attack = dict(epsilon=epsilon, step_size=step_size, steps=steps)
    self.lam, self.clean_weight, self.temperature = lam, clean_weight, temperature
    self.augment_images = augment_images
    self.optimizer = torch.optim.SGD(self.module.parameters(), lr=learning_rate,
                                     momentum=momentum, weight_decay=weight_decay)

  def __call__(self, images_uint8, y):
    device_type = images_uint8.device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.bfloat16):
      return self._step(images_uint8, y)

  def _layout(self, x):
    return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

  def loss(self, x, x_adv, y):
    """CE(adv) + w CE(clean) + lambda InfoNCE of one joint train-mode forward (BatchNorm batch
    statistics, running averages updated)."""
    self.module.train()
    both = self._layout(torch.stack([x, x_adv], 1).reshape(-1, *x.shape[1:]))
    logits, z = self.model(both)
    ce_clean = F.cross_entropy(logits[0::2].float(), y)
    ce_adv = F.cross_entropy(logits[1::2].float(), y)
    return ce_adv + self.clean_weight * ce_clean + self.lam * info_nce_pair(
        z[0::2].float(), z[1::2].float(), y, self.temperature)

  def _step(self, images_uint8, y):
    x = self._layout(images_uint8.float() / 255.0)
    if self.augment_images:
      x = self._layout(augment(x))
    self.module.eval()
    x_adv = pgd(self.model, x, y, **self.attack)
    loss = self.loss(x, x_adv, y)
    self.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    self.optimizer.step()
    return loss.detach()
