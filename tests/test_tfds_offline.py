"""Fashion-MNIST prepared offline as a real TFDS dataset: from small IDX files of the test's own,
and from the real files of Debian's package where it is installed."""

import os
import subprocess
import sys

import numpy as np
import pytest

from clead_jax import input_pipeline
from clead_jax import tfds_offline
from clead_jax.errors import UserError
from tests.conftest import REPO, digits_config

LABEL_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
               "Sneaker", "Bag", "Ankle boot"]  # TFDS's fashion_mnist label names


def _write_small_idx(directory, sizes=(("train", 60), ("test", 25)), seed=0):
  """Random 28x28 images and labels as the four gzipped IDX files; returns the arrays."""
  rng = np.random.default_rng(seed)
  arrays = {}
  for split, n in sizes:
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    image_file, label_file = tfds_offline.FASHION_MNIST_FILES[split]
    tfds_offline.write_idx(os.path.join(directory, image_file), images)
    tfds_offline.write_idx(os.path.join(directory, label_file), labels)
    arrays[split] = (images[..., None], labels.astype(np.int64))
  return arrays


def _read_through_tfds(data_dir):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder("fashion_mnist", data_dir=str(data_dir))
  splits = tfds.as_numpy(builder.as_dataset(split=["train", "test"], batch_size=-1,
                                            shuffle_files=False))
  return builder, dict(zip(["train", "test"], splits))


def _assert_same_as_decoded(data_dir, arrays):
  builder, splits = _read_through_tfds(data_dir)
  assert builder.info.features["label"].names == LABEL_NAMES
  assert builder.info.features["image"].shape == (28, 28, 1)
  for split, (images, labels) in arrays.items():
    order = tfds_offline.tfds_order(len(labels), split)  # TFDS stores examples by key hash
    np.testing.assert_array_equal(splits[split]["image"], images[order])
    np.testing.assert_array_equal(splits[split]["label"], labels[order])


@pytest.fixture(scope="module")
def small(tmp_path_factory):
  source = tmp_path_factory.mktemp("idx")
  arrays = _write_small_idx(str(source))
  data_dir = tmp_path_factory.mktemp("tfds")
  written = tfds_offline.prepare_fashion_mnist(str(source), str(data_dir))
  return source, data_dir, arrays, written


def test_prepared_dataset_is_tfds_fashion_mnist_and_equals_the_idx_files(small):
  _, data_dir, arrays, written = small
  assert written == os.path.join(str(data_dir), "fashion_mnist", "3.0.1")
  _assert_same_as_decoded(data_dir, arrays)


def test_preparing_again_does_nothing_and_the_loader_reads_it(small):
  source, data_dir, arrays, written = small
  before = {name: os.stat(os.path.join(written, name)).st_mtime_ns for name in os.listdir(written)}
  assert tfds_offline.prepare_fashion_mnist(str(source), str(data_dir)) == written
  assert {name: os.stat(os.path.join(written, name)).st_mtime_ns
          for name in os.listdir(written)} == before
  config = digits_config(**{"data.name": "fashion_mnist", "data.data_dir": str(data_dir),
                            "data.download": False, "data.validation_size": 10})
  dataset = input_pipeline.load_dataset(config.data)
  assert dataset.train_images.shape == (50, 28, 28, 1) and dataset.validation_labels.shape == (10,)
  assert dataset.test_images.shape == (25, 28, 28, 1) and dataset.num_classes == 10
  order = tfds_offline.tfds_order(60, "train")
  np.testing.assert_array_equal(dataset.validation_images, arrays["train"][0][order][50:])


def test_a_truncated_file_is_one_error_and_nothing_is_written(tmp_path):
  source = tmp_path / "idx"
  source.mkdir()
  _write_small_idx(str(source))
  path = source / tfds_offline.FASHION_MNIST_FILES["test"][0]
  tfds_offline.write_idx(str(path), np.zeros((25, 28, 27), np.uint8))
  data_dir = tmp_path / "tfds"
  with pytest.raises(UserError, match="28x28"):
    tfds_offline.prepare_fashion_mnist(str(source), str(data_dir))
  assert not data_dir.exists()
  import gzip  # pylint: disable=g-import-not-at-top
  with gzip.open(path, "wb") as f:
    f.write(b"\x00\x00\x08\x03" + (25).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + b"x")
  with pytest.raises(UserError, match="truncated"):
    tfds_offline.prepare_fashion_mnist(str(source), str(data_dir))


def test_prepare_command_and_the_missing_dataset_message(tmp_path):
  """The command prepares from --from; a missing dataset names both routes (download, and the
  offline command with the Debian package) in one line."""
  source = tmp_path / "idx"
  source.mkdir()
  _write_small_idx(str(source), sizes=(("train", 12), ("test", 5)))
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  done = subprocess.run([sys.executable, "-m", "clead_jax.prepare", "fashion_mnist", "--from",
                         str(source), "--data_dir", str(tmp_path / "tfds")], cwd=str(tmp_path),
                        env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  assert "is prepared in" in done.stdout and not done.stderr.strip(), done.stderr[-2000:]
  missing = subprocess.run(
      [sys.executable, "-m", "clead_jax.main", "--config",
       os.path.join(REPO, "configs", "fashion_mnist.py:cpu"), "--workdir", str(tmp_path / "run"),
       f"--config.data.data_dir={tmp_path / 'empty'}", "--config.data.download=False"],
      cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
  assert missing.returncode == 2
  lines = missing.stderr.strip().splitlines()
  assert len(lines) == 1, missing.stderr[-3000:]
  for part in ("--config.data.download=True", "python -m clead_jax.prepare fashion_mnist",
               "apt-get install dataset-fashion-mnist"):
    assert part in lines[0], lines[0]
  assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.skipif(tfds_offline.debian_directory() is None,
                    reason="Debian's Fashion-MNIST is not installed: "
                           "apt-get install dataset-fashion-mnist")
def test_the_real_files_prepare_to_the_published_splits(tmp_path):
  source = tfds_offline.debian_directory()
  arrays = {split: tfds_offline.read_fashion_mnist_split(source, split)
            for split in ("train", "test")}
  assert len(arrays["train"][1]) == 60000 and len(arrays["test"][1]) == 10000
  assert np.bincount(arrays["test"][1]).tolist() == [1000] * 10
  tfds_offline.prepare_fashion_mnist(source, str(tmp_path))
  _assert_same_as_decoded(tmp_path, arrays)
