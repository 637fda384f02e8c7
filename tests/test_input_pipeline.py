"""The input pipeline: a real TFDS dataset written to disk and read back through the cifar10
builder, the digits split, the deterministic global-batch order and per-process shards."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from clead_jax import input_pipeline
from clead_jax.errors import UserError
from tests.conftest import digits_config

NUM_TRAIN, NUM_TEST = 48, 16


@pytest.fixture(scope="module")
def cifar10_on_disk(tmp_path_factory):
  """A small dataset stored in TFDS's on-disk format under the name and version of cifar10."""
  data_dir = tmp_path_factory.mktemp("tfds")
  builder = tfds.builder("cifar10", data_dir=str(data_dir))  # the real builder: its features
  rng = np.random.default_rng(0)

  def split(n, offset):
    return [(offset + i, {"id": f"{offset + i}",
                          "image": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
                          "label": int((offset + i) % 10)}) for i in range(n)]

  tfds.dataset_builders.store_as_tfds_dataset(
      name="cifar10", version=str(builder.version), features=builder.info.features,
      split_datasets={"train": split(NUM_TRAIN, 0), "test": split(NUM_TEST, NUM_TRAIN)},
      data_dir=str(data_dir))
  return str(data_dir)


def _data_config(name, data_dir, download=False):
  config = digits_config().data
  config.name, config.data_dir, config.download = name, data_dir, download
  return config


def test_tfds_dataset_shapes_dtypes_and_labels(cifar10_on_disk):
  dataset = input_pipeline.load_dataset(_data_config("cifar10", cifar10_on_disk))
  assert dataset.train_images.shape == (NUM_TRAIN, 32, 32, 3)
  assert dataset.test_images.shape == (NUM_TEST, 32, 32, 3)
  assert dataset.train_images.dtype == np.uint8 and dataset.train_labels.dtype == np.int32
  assert dataset.num_classes == 10
  assert set(dataset.train_labels) <= set(range(10)) and set(dataset.test_labels) <= set(range(10))
  assert len(dataset.mean) == 3 and len(dataset.std) == 3


def test_tfds_order_is_deterministic(cifar10_on_disk):
  first = input_pipeline.load_dataset(_data_config("cifar10", cifar10_on_disk))
  second = input_pipeline.load_dataset(_data_config("cifar10", cifar10_on_disk))
  np.testing.assert_array_equal(first.train_images, second.train_images)
  np.testing.assert_array_equal(first.train_labels, second.train_labels)
  a = input_pipeline.global_batch_indices(NUM_TRAIN, 16, seed=3, step=5)
  b = input_pipeline.global_batch_indices(NUM_TRAIN, 16, seed=3, step=5)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, input_pipeline.global_batch_indices(NUM_TRAIN, 16, seed=4, step=5))


def test_missing_dataset_offline_is_one_clear_line(tmp_path):
  with pytest.raises(UserError) as error:
    input_pipeline.load_dataset(_data_config("cifar100", str(tmp_path), download=False))
  message = str(error.value)
  assert "\n" not in message and str(tmp_path) in message and "config.data.data_dir" in message


def test_digits_split_is_fixed():
  dataset = input_pipeline.load_dataset(digits_config().data)
  assert dataset.train_images.shape == (1437, 8, 8, 1)
  assert dataset.test_images.shape == (360, 8, 8, 1)
  assert 0.0 <= dataset.train_images.min() and dataset.train_images.max() <= 1.0
  again = input_pipeline.load_dataset(digits_config().data)
  np.testing.assert_array_equal(dataset.test_labels, again.test_labels)


def test_epochs_cover_every_example_once_and_processes_split_the_batch():
  n, batch = 50, 10
  per_epoch = input_pipeline.steps_per_epoch(n, batch)
  epoch0 = np.concatenate([input_pipeline.global_batch_indices(n, batch, 0, s)
                           for s in range(per_epoch)])
  assert sorted(epoch0) == list(range(n))
  epoch1 = input_pipeline.global_batch_indices(n, batch, 0, per_epoch)
  assert not np.array_equal(epoch1, epoch0[:batch])  # reshuffled each epoch
  images, labels = np.arange(n) * 10, np.arange(n)
  indices = input_pipeline.global_batch_indices(n, batch, 0, 2)
  parts = [input_pipeline.local_batch(images, labels, indices, p, 2) for p in range(2)]
  np.testing.assert_array_equal(np.concatenate([p["label"] for p in parts]), indices)
