"""What the benchmark times: the compiled C-LEAD train step and the evaluation attacks of
clead_jax, and the same computations in the PyTorch reference, on random CIFAR-shaped data.

The JAX side goes through the library's own code paths (train.build, train.make_train_step,
train.jit_train_step, methods.METHODS['clead'], evaluation.suite), so what is timed is
what training and evaluation run.
"""

import contextlib
import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from clead_jax import config_tools
from clead_jax import input_pipeline
from clead_jax import models
from clead_jax import methods
from clead_jax import parallel
from clead_jax import train
from clead_jax import train_state
from clead_jax.evaluation import suite
from clead_jax.bench import measure

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "configs", "cifar10.py")
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)


@dataclasses.dataclass
class Timing:
  """One timed workload: the median step time over `times`, and what it implies."""
  batch_size: int
  seconds: float
  times: list
  compile_s: float = float("nan")
  flops_per_image: float = float("nan")
  # One profiled run: its top XLA operations (ms, calls, instruction, op) and time per kind.
  profile: tuple = None

  @property
  def images_per_s(self):
    return self.batch_size / self.seconds


def load_config(path=DEFAULT_CONFIG, overrides=None):
  """get_config() of a config file, with 'a.b' -> value overrides."""
  return config_tools.set_fields(config_tools.load_config_file(path), overrides)


def fake_cifar(batch_size, seed=0):
  """A CIFAR-10-shaped dataset of one batch of random uint8 images."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (batch_size, 32, 32, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, batch_size).astype(np.int32)
  return input_pipeline.Dataset("cifar10", images, labels, images, labels, 10, CIFAR10_MEAN,
                                CIFAR10_STD)


# --- JAX ------------------------------------------------------------------------------------------

@contextlib.contextmanager
def convolutions(kind):
  """kind 'autodiff': models.conv2d is plain lax.conv_general_dilated with autodiff's gradients,
  as clead_jax was before its CPU gradient rules; kept to measure what they buy. 'custom': as is."""
  if kind == "custom":
    yield
    return
  saved = models.conv2d
  models.conv2d = lambda x, kernel, strides, padding: lax.conv_general_dilated(
      x, kernel, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
  try:
    yield
  finally:
    models.conv2d = saved


def _profile(run, compiled, directory):
  if not directory:
    return None
  return measure.profile_ops(run, compiled.as_text(), directory)


def jax_train_step(config, runs, warmup=1, method="clead", profile_dir=None):
  """The jitted train step of `method`: compile time, then the median over `runs` steps; with
  profile_dir, one more step under the profiler."""
  dataset = fake_cifar(config.train.batch_size, config.seed)
  model = train_state.build(config, dataset)
  mesh = parallel.make_mesh()
  state = train_state.init_state(model, config.seed, mesh)
  step_fn = train.make_train_step(methods.Context(model.network, config), methods.METHODS[method],
                                  model.tx, model.schedule)
  batch = jax.device_put({"image": dataset.train_images, "label": dataset.train_labels},
                         parallel.batch_sharding(mesh))
  flops = measure.count_flops(step_fn, state, batch)
  start = time.perf_counter()
  compiled = train.jit_train_step(step_fn, mesh).lower(state, batch).compile()
  compile_s = time.perf_counter() - start

  def run():
    nonlocal state
    state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))

  seconds, times = measure.median_seconds(run, runs, warmup)
  return Timing(config.train.batch_size, seconds, times, compile_s, flops / config.train.batch_size,
                _profile(run, compiled, profile_dir))


def jax_attack(config, attack_name, batch_size, runs, warmup=1, profile_dir=None):
  """suite.WHITE_BOX_ATTACKS[attack_name] on an inference-mode float32 model, as evaluation runs
  it (AutoAttack as one jitted function: every stage on the whole batch)."""
  dataset = fake_cifar(batch_size, config.seed)
  model = train_state.build(config, dataset)
  state = train_state.create_train_state(model.network, model.tx, dataset.image_shape,
                                         config.seed)
  attack = suite.WHITE_BOX_ATTACKS[attack_name]
  network = models.in_float32(model.network)
  apply_fn = lambda v, x: network.apply(v, x, train=False)
  variables = state.variables

  def attack_fn(variables, images, labels):
    keys = jax.random.split(jax.random.key(config.seed), images.shape[0])
    return attack(apply_fn, variables, input_pipeline.to_float(images), labels, keys,
                  epsilon=config.attack.epsilon, norm=config.attack.norm)

  args = (variables, jnp.asarray(dataset.test_images), jnp.asarray(dataset.test_labels))
  flops = measure.count_flops(attack_fn, *args)
  start = time.perf_counter()
  compiled = jax.jit(attack_fn).lower(*args).compile()
  compile_s = time.perf_counter() - start
  run = lambda: compiled(*args).block_until_ready()
  seconds, times = measure.median_seconds(run, runs, warmup)
  return Timing(batch_size, seconds, times, compile_s, flops / batch_size,
                _profile(run, compiled, profile_dir))


# --- PyTorch --------------------------------------------------------------------------------------

def _torch_model(config, device):
  from clead_jax.bench import torch_reference  # pylint: disable=g-import-not-at-top
  if config.model.name != "resnet18":
    raise ValueError(f"the PyTorch reference has resnet18 only, not {config.model.name!r}")
  return torch_reference.ResNet18(config.model.width, 10, config.model.projection_dim,
                                  CIFAR10_MEAN, CIFAR10_STD).to(device)


def _torch_batch(batch_size, seed, device):
  import torch  # pylint: disable=g-import-not-at-top
  dataset = fake_cifar(batch_size, seed)
  images = torch.from_numpy(dataset.train_images).permute(0, 3, 1, 2).contiguous().to(device)
  return images, torch.from_numpy(dataset.train_labels).long().to(device)


def _torch_sync(device):
  import torch  # pylint: disable=g-import-not-at-top
  if device.startswith("cuda"):
    torch.cuda.synchronize()


def torch_clead_step(config, device="cpu", compiled=False, compile_backend="inductor"):
  """The PyTorch reference's C-LEAD step object for a config (eager, or under torch.compile)."""
  import torch  # pylint: disable=g-import-not-at-top
  from clead_jax.bench import torch_reference  # pylint: disable=g-import-not-at-top
  if config.method != "clead" or config.loss.positives != "pair" or config.attack.norm != "linf":
    raise ValueError("the PyTorch reference is C-LEAD with pair positives under L-inf only")
  torch.manual_seed(config.seed)
  return torch_reference.CleadStep(
      _torch_model(config, device), epsilon=config.attack.epsilon,
      step_size=config.attack.step_size, steps=config.attack.steps, lam=config.loss.lam,
      clean_weight=config.loss.clean_weight, temperature=config.loss.temperature,
      learning_rate=config.train.learning_rate, momentum=config.train.momentum,
      weight_decay=config.train.weight_decay, augment_images=config.data.augment,
      bfloat16=config.model.dtype == "bfloat16", compiled=compiled,
      compile_backend=compile_backend)


TORCH_REFERENCES = {"torch": False, "torch_compile": True}  # name -> under torch.compile


def torch_train_step(config, runs, warmup=1, device="cpu", reference="torch"):
  """The PyTorch reference C-LEAD step for the same config, same batch size; `reference`
  'torch' (eager, channels_last, cuDNN benchmark) or 'torch_compile'."""
  step = torch_clead_step(config, device, compiled=TORCH_REFERENCES[reference])
  images, labels = _torch_batch(config.train.batch_size, config.seed, device)

  def run():
    step(images, labels)
    _torch_sync(device)

  seconds, times = measure.median_seconds(run, runs, max(warmup, 1 if step.model is not
                                                             step.module else warmup))
  return Timing(config.train.batch_size, seconds, times)


def torch_pgd(config, steps, step_divisor, batch_size, runs, warmup=1, device="cpu"):
  """The reference evaluation PGD (keeps misclassified iterates), model in eval mode."""
  import torch  # pylint: disable=g-import-not-at-top
  from clead_jax.bench import torch_reference  # pylint: disable=g-import-not-at-top
  torch.manual_seed(config.seed)
  model = _torch_model(config, device).eval()
  images, labels = _torch_batch(batch_size, config.seed, device)
  epsilon = config.attack.epsilon

  def run():
    with torch.autocast(images.device.type, dtype=torch.bfloat16,
                        enabled=config.model.dtype == "bfloat16"):
      torch_reference.pgd(model, images.float() / 255.0, labels, epsilon=epsilon,
                          step_size=epsilon / step_divisor, steps=steps, keep_misclassified=True)
    _torch_sync(device)

  seconds, times = measure.median_seconds(run, runs, warmup)
  return Timing(batch_size, seconds, times)


# --- AutoAttack against the reference --------------------------------------------------------------

def autoattack_compare(config, num_examples, batch_size, *, epsilon, reference=True,
                       torch_device="cpu"):
  """AutoAttack (standard) on `num_examples` random CIFAR-shaped images for one random-weight
  model, ours (the evaluation's Runner, stage by stage on the points still robust) and, with
  `reference`, the reference (pyautoattack) on the same weights and points. The labels are the
  model's own predictions (every point starts correct); a small epsilon leaves part of the
  points to the later stages. Returns per-stage accuracies and times of both."""
  from clead_jax import torch_weights  # pylint: disable=g-import-not-at-top
  from clead_jax.evaluation import autoattack_runner  # pylint: disable=g-import-not-at-top
  dataset = fake_cifar(num_examples, config.seed)
  model = train_state.build(config, dataset)
  state = jax.device_get(train_state.create_train_state(model.network, model.tx,
                                                        dataset.image_shape, config.seed))
  network = models.in_float32(model.network)
  apply_fn = lambda v, x: network.apply(v, x, train=False)
  variables = state.variables
  images = dataset.test_images
  labels = np.asarray(jnp.argmax(jax.jit(apply_fn)(variables, input_pipeline.to_float(images))[0],
                                 -1)).astype(np.int32)
  runner = autoattack_runner.Runner(apply_fn, parallel.make_mesh(), config.attack.norm,
                                    batch_size, config.seed)
  start = time.perf_counter()
  ours = runner.run(variables, images, labels, epsilon)
  result = {"num_examples": num_examples, "epsilon": epsilon, "labels": "the model's own "
            "predictions (random weights, random images: synthetic)",
            "ours": {"time_s": time.perf_counter() - start,
                     "robust_accuracy": float(ours.robust_after[-1].mean()),
                     "stages": {name: {"accuracy_after": float(flags.mean()), "time_s": t}
                                for name, flags, t in zip(ours.stage_names, ours.robust_after,
                                                          ours.stage_times_s)}}}
  if reference:
    from clead_jax import crosscheck  # pylint: disable=g-import-not-at-top
    arch = torch_weights.architecture(config.model, dataset.image_shape, dataset.num_classes)
    module = torch_weights.torch_module(arch, dataset.mean, dataset.std,
                                 torch_weights.to_torch(config.model, variables)[0])
    times = {}
    robust, after, seconds = crosscheck.reference_autoattack(
        module, input_pipeline.to_float(images), labels, epsilon=epsilon,
        norm=config.attack.norm, batch_size=batch_size, device=torch_device, stage_times=times)
    result["reference"] = {"time_s": seconds, "robust_accuracy": float(robust.mean()),
                           "stages": {crosscheck.STAGES[name]: {"accuracy_after": after[name],
                                                                "time_s": times.get(name)}
                                      for name in after}}
    result["ratio"] = seconds / result["ours"]["time_s"]
  return result


def write_synthetic_cifar10(data_dir, num_train=50000, num_test=10000, seed=0):
  """A TFDS `cifar10` of random images and labels (SYNTHETIC: for timing the real loop on a
  machine without the dataset) in data_dir/cifar10; the same features and splits as TFDS's."""
  from clead_jax import input_pipeline as pipeline  # pylint: disable=g-import-not-at-top
  tfds = pipeline.import_tfds()
  from tensorflow_datasets.image_classification import cifar  # pylint: disable=g-import-not-at-top

  class SyntheticCifar10(cifar.Cifar10, skip_registration=True):
    name = "cifar10"

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples("train", num_train),
              "test": self._generate_examples("test", num_test)}

    def _generate_examples(self, split, count):  # pylint: disable=arguments-differ
      rng = np.random.default_rng([seed, 0 if split == "train" else 1])
      for index in range(count):
        yield index, {"id": f"{split}_{index:05d}",
                      "image": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
                      "label": int(rng.integers(0, 10))}

  builder = SyntheticCifar10(data_dir=data_dir)
  if not builder.is_prepared():
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        try_download_gcs=False, compute_stats=tfds.download.ComputeStatsMode.SKIP))
  return builder.data_dir


def loop_rate(workdir):
  """The training loop's images/s: the median of metrics.jsonl's per-log rates after the first
  log interval (which holds the compile and the input pipeline's start)."""
  import json  # pylint: disable=g-import-not-at-top
  import statistics  # pylint: disable=g-import-not-at-top
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    lines = [json.loads(line) for line in f if line.strip()]
  rates = [line["images_per_s"] for line in lines if "images_per_s" in line][1:]
  with open(os.path.join(workdir, "config.json")) as f:
    config = json.load(f)
  return {"loop_images_per_s": statistics.median(rates) if rates else None,
          "log_intervals": len(rates), "model": config["model"]["name"],
          "batch": config["train"]["batch_size"], "dtype": config["model"]["dtype"],
          "data": f"{config['data']['name']} from {config['data']['data_dir']} (SYNTHETIC images "
                  "when written by bench synthetic_cifar10)"}

