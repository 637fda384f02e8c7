"""Datasets held in host memory, a deterministic global-batch order, per-process shards,
host-to-device prefetch, and on-device augmentation.

Datasets (config.data.name): the five listed in DATASETS; any other TFDS image-classification
dataset by name (classes and splits from its info, channel statistics computed once and cached
beside its files); and npz:DIR, a user's own uint8 arrays in DIR/train.npz and DIR/test.npz.

Every supported dataset fits in host memory (CIFAR-10/100: 180 MB, SVHN: 240 MB as uint8), so
the whole split is loaded once and batches are drawn by index. The order of step s depends only
on (seed, s): a resumed run sees exactly the batches the uninterrupted run would have seen.
"""

import collections
import dataclasses
import json
import os
import re
import socket
import sys
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from clead_jax.errors import UserError

# Digits: scikit-learn's bundled 1,797 8x8 images (pixel values 0..16, scaled to [0, 1]). The
# split is fixed: a permutation with numpy seed 0; the first 1,437 images train, the last 360 test.
DIGITS_SPLIT_SEED = 0
DIGITS_TEST_SIZE = 360

# Hosts TFDS downloads each dataset from; probed before a download so that an offline machine
# gets one clear message instead of minutes of retries.
_DOWNLOAD_HOSTS = {
    "fashion_mnist": "fashion-mnist.s3-website.eu-central-1.amazonaws.com",
    "cifar10": "www.cs.toronto.edu",
    "cifar100": "www.cs.toronto.edu",
    "svhn_cropped": "ufldl.stanford.edu",
}

# Per-channel mean/std used by the model's first layer.
_STATS = {
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn_cropped": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
}


@dataclasses.dataclass
class Dataset:
  """A whole dataset in host memory. Images are NHWC, uint8 in [0, 255] or float32 in [0, 1].

  The validation split is held out from the end of the training split (config.data.
  validation_size); it is what training evaluates on and picks a best checkpoint by, so that no
  test image takes part in training or selection.
  """
  name: str
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  num_classes: int
  mean: tuple
  std: tuple
  validation_images: np.ndarray = None
  validation_labels: np.ndarray = None

  @property
  def image_shape(self):
    return self.train_images.shape[1:]


def load_digits(data_config) -> Dataset:
  del data_config
  from sklearn.datasets import load_digits as sklearn_digits  # pylint: disable=g-import-not-at-top
  digits = sklearn_digits()
  images = (digits.images / 16.0).astype(np.float32)[..., None]
  labels = digits.target.astype(np.int32)
  order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(labels))
  train, test = order[:-DIGITS_TEST_SIZE], order[-DIGITS_TEST_SIZE:]
  mean, std = float(images[train].mean()), float(images[train].std())
  return Dataset("digits", images[train], labels[train], images[test], labels[test], 10,
                 (mean,), (std,))


def _host_reachable(host, timeout=5.0):
  try:
    socket.create_connection((host, 443), timeout=timeout).close()
    return True
  except OSError:
    return False


def _not_prepared(name, where):
  return UserError(f"dataset {name!r} is not prepared in {where} and config.data.download is "
                   f"False; download it with --config.data.download=True (internet needed), "
                   f"or {_supply(name, where)}")


def _supply(name, where):
  """How to get a missing dataset: copy a prepared one, or (offline) prepare it from files."""
  routes = (f"copy a prepared '{name}' TFDS dataset into {where} or point --config.data.data_dir "
            "at a directory holding one")
  if name in OFFLINE_SOURCES:
    routes += (f"; or, offline, `python -m clead_jax.prepare {name} --data_dir {where}` "
               f"({OFFLINE_SOURCES[name]})")
  return routes


# Datasets `python -m clead_jax.prepare` builds without network, and from what.
OFFLINE_SOURCES = {
    "fashion_mnist": "from the four original IDX files, e.g. Debian's package "
                     "dataset-fashion-mnist: apt-get install dataset-fashion-mnist",
}


def import_tfds():
  """tensorflow_datasets, imported with TensorFlow's start-up lines (C++ logging, written to
  file descriptor 2 before any Python logging is set up) kept off the terminal; TFDS's notices
  ("no dataset_info.json" and the like) go to the log file only."""
  import logging  # pylint: disable=g-import-not-at-top
  logging.getLogger("absl").setLevel(logging.ERROR)
  if "tensorflow" not in sys.modules:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    saved = os.dup(2)
    try:
      with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        import tensorflow  # pylint: disable=g-import-not-at-top,unused-import
    finally:
      os.dup2(saved, 2)
      os.close(saved)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()
  return tfds


def tfds_builder(name, data_dir):
  return import_tfds().builder(name, data_dir=data_dir or None)


def _tfds_builder_or_error(name, data_dir):
  try:
    return tfds_builder(name, data_dir)
  except Exception as e:  # pylint: disable=broad-except  (TFDS's not-found errors vary by version)
    raise UserError(f"config.data.name={name!r} is unknown; choose one of {sorted(DATASETS)}, "
                    f"npz:DIR, or a dataset TFDS knows ({type(e).__name__}: "
                    f"{str(e).splitlines()[0][:160]})") from None


def _image_classification_info(builder, name):
  """(num_classes, train split, test split) of a TFDS dataset with 'image' and 'label'
  features; a UserError naming what is missing otherwise."""
  tfds = import_tfds()
  features = builder.info.features
  image = features["image"] if "image" in features else None
  label = features["label"] if "label" in features else None
  if (not isinstance(image, tfds.features.Image)
      or not isinstance(label, tfds.features.ClassLabel)):
    raise UserError(f"dataset {name!r} has features {sorted(features.keys())}; clead_jax needs an "
                    "'image' (Image) and a 'label' (ClassLabel) feature")
  if None in tuple(image.shape):
    raise UserError(f"dataset {name!r} has images of varying size {tuple(image.shape)}; "
                    "clead_jax needs one image shape (resize them into an npz:DIR dataset)")
  splits = sorted(builder.info.splits.keys())
  test = next((s for s in ("test", "validation") if s in splits), None)
  if "train" not in splits or test is None:
    raise UserError(f"dataset {name!r} has splits {splits}; clead_jax needs 'train' and 'test' "
                    "(or 'validation')")
  return label.num_classes, "train", test


STATS_FILE = "clead_jax_channel_stats.json"  # beside a TFDS dataset's files


def channel_stats(images, directory=None):
  """Per-channel (mean, std) of uint8 images in [0, 1] units; cached as DIR/STATS_FILE when a
  directory is given (computed on the training split once)."""
  path = os.path.join(directory, STATS_FILE) if directory else None
  if path and os.path.exists(path):
    with open(path) as f:
      cached = json.load(f)
    return tuple(cached["mean"]), tuple(cached["std"])
  total, squares, count = 0.0, 0.0, 0
  for start in range(0, len(images), 4096):  # in chunks: float64 copies of CIFAR would be 1 GB
    pixels = images[start:start + 4096].reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
    total, squares = total + pixels.sum(0), squares + (pixels ** 2).sum(0)
    count += len(pixels)
  mean = total / count
  std = np.sqrt(np.maximum(squares / count - mean ** 2, 1e-6))
  mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
  if path:
    try:
      with open(path + ".tmp", "w") as f:
        json.dump({"mean": mean, "std": std, "of": "the training split, pixels / 255"}, f)
      os.replace(path + ".tmp", path)
    except OSError:
      pass  # a read-only data directory: computed again next time
  return mean, std


def load_tfds(name: str, data_config) -> Dataset:
  """Loads a TFDS image-classification dataset whole into host memory: one of DATASETS, or any
  other with 'image' and 'label' features (classes, shape and splits from the builder's info)."""
  data_dir = os.path.expanduser(data_config.data_dir) if data_config.data_dir else ""
  if (name in DATASETS and data_dir and not data_config.download
      and not os.path.isdir(os.path.join(data_dir, name))):
    # Said before TensorFlow loads (5 s): a dataset TFDS keeps nowhere under data_dir.
    raise _not_prepared(name, os.path.abspath(data_dir))
  tfds = import_tfds()
  builder = _tfds_builder_or_error(name, data_config.data_dir)
  if not builder.is_prepared():
    where = os.path.dirname(os.path.dirname(builder.data_dir))
    if not data_config.download:
      raise _not_prepared(name, where)
    host = _DOWNLOAD_HOSTS.get(name)
    if host and not _host_reachable(host):
      raise UserError(f"dataset {name!r} is not prepared in {where} and its source {host} cannot "
                      f"be reached (offline?); run once on a machine with internet, or "
                      f"{_supply(name, where)}")
    try:
      builder.download_and_prepare()
    except Exception as e:  # pylint: disable=broad-except
      raise UserError(f"dataset {name!r} could not be downloaded into {where} "
                      f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                      f"{_supply(name, where)}") from e
  num_classes, train_split, test_split = _image_classification_info(builder, name)
  splits = tfds.as_numpy(builder.as_dataset(split=[train_split, test_split], batch_size=-1,
                                            shuffle_files=False))
  (train, test) = splits
  mean, std = _STATS[name] if name in _STATS else channel_stats(train["image"], builder.data_dir)
  return Dataset(name, train["image"], train["label"].astype(np.int32), test["image"],
                 test["label"].astype(np.int32), num_classes, mean, std)


# --- your own arrays: config.data.name = "npz:DIR" ----------------------------------------------

NPZ_PREFIX = "npz:"
NPZ_SPLITS = ("train", "test")


def _read_npz_split(directory, split, field):
  """(images, labels) of DIR/<split>.npz, checked: uint8 NHWC `images`, integer `labels`."""
  path = os.path.join(directory, f"{split}.npz")
  if not os.path.isfile(path):
    raise UserError(f"{field}: {path} does not exist; an npz dataset is a directory holding "
                    f"train.npz and test.npz, each with uint8 NHWC 'images' and integer 'labels'")
  try:
    with np.load(path, allow_pickle=False) as saved:
      missing = [key for key in ("images", "labels") if key not in saved.files]
      if missing:
        raise UserError(f"{field}: {path} has no {' or '.join(repr(m) for m in missing)} array "
                        f"(it has {sorted(saved.files)}); save it with np.savez(path, "
                        "images=..., labels=...)")
      images, labels = saved["images"], saved["labels"]
  except (OSError, ValueError) as e:
    raise UserError(f"{field}: {path} cannot be read as an npz file "
                    f"({str(e).splitlines()[0][:200]})") from None
  if images.dtype != np.uint8 or images.ndim != 4:
    raise UserError(f"{field}: {path}: 'images' is {images.dtype} of shape {images.shape}; "
                    "expected uint8 of shape (N, height, width, channels)")
  if not np.issubdtype(labels.dtype, np.integer) or labels.shape != (len(images),):
    raise UserError(f"{field}: {path}: 'labels' is {labels.dtype} of shape {labels.shape}; "
                    f"expected integers of shape ({len(images)},), one per image")
  if len(labels) and labels.min() < 0:
    raise UserError(f"{field}: {path}: 'labels' holds {labels.min()}; labels are class "
                    "indices 0, 1, ..., num_classes - 1")
  return images, labels.astype(np.int32)


def load_npz(data_config) -> Dataset:
  """DIR/train.npz and DIR/test.npz (config.data.name 'npz:DIR'); the classes are 0 .. the
  largest training label, and the per-channel mean and std are the training split's."""
  name = data_config.name
  directory = os.path.expanduser(name[len(NPZ_PREFIX):])
  field = f"config.data.name={name}"
  if not os.path.isdir(directory):
    raise UserError(f"{field}: {directory!r} is not a directory; give npz:DIR with DIR holding "
                    "train.npz and test.npz")
  (train_images, train_labels), (test_images, test_labels) = (
      _read_npz_split(directory, split, field) for split in NPZ_SPLITS)
  if not len(train_labels) or not len(test_labels):
    raise UserError(f"{field}: train.npz holds {len(train_labels)} and test.npz "
                    f"{len(test_labels)} images; each needs at least one")
  if train_images.shape[1:] != test_images.shape[1:]:
    raise UserError(f"{field}: train.npz images are {train_images.shape[1:]} but test.npz's are "
                    f"{test_images.shape[1:]}; both splits need one image shape")
  num_classes = int(train_labels.max()) + 1
  if num_classes < 2 or test_labels.max() >= num_classes:
    raise UserError(f"{field}: the training labels span {num_classes} class(es) and the test "
                    f"labels reach {int(test_labels.max())}; every class needs training images "
                    "(and at least two classes)")
  return Dataset(name, train_images, train_labels, test_images, test_labels, num_classes,
                 *channel_stats(train_images))


# A TFDS name: dataset, optionally /config and :version.
_TFDS_NAME = re.compile(r"[a-z][a-z0-9_]*(/[A-Za-z0-9_.\-]+)?(:[0-9.*]+)?")


def _tfds_knows(name):
  """Whether TFDS has a builder of that name (imports TFDS: only for names not listed here)."""
  if not _TFDS_NAME.fullmatch(name):
    return False
  try:
    import_tfds().builder_cls(re.split("[/:]", name)[0])
    return True
  except Exception:  # pylint: disable=broad-except  (TFDS's not-found errors vary by version)
    return False


def check_name(name: str, field: str = "config.data.name"):
  """A listed dataset, npz:DIR (checked when it is loaded) or a dataset TFDS knows."""
  if name not in DATASETS and not name.startswith(NPZ_PREFIX) and not _tfds_knows(name):
    raise UserError(f"{field}={name!r} is unknown; choose one of {sorted(DATASETS)}, "
                    "npz:DIR for a directory holding train.npz and test.npz, or the name of a "
                    "TFDS image-classification dataset")


# The dataset registry: config.data.name -> loader(data_config).
DATASETS: dict[str, Callable[..., Dataset]] = {
    "digits": load_digits,
    "fashion_mnist": lambda dc: load_tfds("fashion_mnist", dc),
    "cifar10": lambda dc: load_tfds("cifar10", dc),
    "cifar100": lambda dc: load_tfds("cifar100", dc),
    "svhn_cropped": lambda dc: load_tfds("svhn_cropped", dc),
}


def load_dataset(data_config) -> Dataset:
  """The dataset, with the validation split held out and the training split cut as configured."""
  check_name(data_config.name)
  name = data_config.name
  loader = (load_npz if name.startswith(NPZ_PREFIX) else DATASETS.get(name)
            or (lambda dc: load_tfds(name, dc)))
  return split_validation(loader(data_config),
                          data_config.get("validation_size", 0), data_config.get("train_size", -1))


def split_validation(dataset: Dataset, validation_size: int, train_size: int = -1) -> Dataset:
  """The last `validation_size` training examples become the validation split; then the first
  `train_size` of the rest (-1: all) are the training split."""
  total = len(dataset.train_labels)
  if validation_size >= total:
    raise UserError(f"config.data.validation_size={validation_size} leaves no training example "
                    f"of the {total}; lower it")
  keep = total - validation_size
  if train_size > keep:
    raise UserError(f"config.data.train_size={train_size} exceeds the {keep} training examples "
                    f"left after the validation split; lower it or set -1 for all")
  end = keep if train_size < 0 else train_size
  return dataclasses.replace(
      dataset, train_images=dataset.train_images[:end], train_labels=dataset.train_labels[:end],
      validation_images=dataset.train_images[keep:], validation_labels=dataset.train_labels[keep:])


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
  """Full global batches per epoch (the remainder is dropped; the next epoch reshuffles)."""
  return num_examples // global_batch


def global_batch_indices(num_examples: int, global_batch: int, seed: int, step: int) -> np.ndarray:
  """Indices of the examples in global batch `step`: a fresh permutation each epoch."""
  per_epoch = steps_per_epoch(num_examples, global_batch)
  epoch, index = divmod(step, per_epoch)
  order = np.random.default_rng([seed, epoch]).permutation(num_examples)
  return order[index * global_batch:(index + 1) * global_batch]


def local_batch(images, labels, indices, process_index, process_count):
  """This process's contiguous slice of a global batch."""
  local = len(indices) // process_count
  mine = indices[process_index * local:(process_index + 1) * local]
  return {"image": images[mine], "label": labels[mine]}


def train_batches(dataset: Dataset, global_batch: int, seed: int, start_step: int,
                  sharding) -> Iterator[dict]:
  """Global, sharded train batches from `start_step` on, one step ahead on the device."""
  process_index, process_count = jax.process_index(), jax.process_count()

  def make(step):
    indices = global_batch_indices(len(dataset.train_labels), global_batch, seed, step)
    host = local_batch(dataset.train_images, dataset.train_labels, indices, process_index,
                       process_count)
    return jax.tree.map(lambda a: jax.make_array_from_process_local_data(sharding, a), host)

  return prefetch(map(make, _count(start_step)), size=2)


def _count(start):
  step = start
  while True:
    yield step
    step += 1


def prefetch(iterator, size=2):
  """Keeps `size` batches in flight: device_put is asynchronous, so the copy overlaps compute."""
  queue = collections.deque()
  for item in iterator:
    queue.append(item)
    if len(queue) == size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def to_float(images):
  """Pixels as float32 in [0, 1] (uint8 images are scaled on the device)."""
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) / 255.0
  return images.astype(jnp.float32)


def augment(images, key, padding=4):
  """Random crop after zero padding, and random horizontal flip; per example, on the device."""
  def one(image, k):
    k_crop, k_flip = jax.random.split(k)
    height, width = image.shape[:2]
    padded = jnp.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    top, left = jax.random.randint(k_crop, (2,), 0, 2 * padding + 1)
    crop = jax.lax.dynamic_slice(padded, (top, left, 0), (height, width, image.shape[2]))
    return jnp.where(jax.random.bernoulli(k_flip), crop[:, ::-1], crop)

  return jax.vmap(one)(images, jax.random.split(key, images.shape[0]))
