"""Real TFDS datasets prepared without network from local files (python -m clead_jax.prepare).

Fashion-MNIST: TFDS's own `fashion_mnist` builder (same name, version, features, label names and
splits) whose example generation reads the four original IDX files from a directory instead of
downloading them. The result is an ordinary prepared TFDS dataset: `tfds.builder("fashion_mnist",
data_dir=...)` finds it and `as_dataset` reads it. TFDS's checksums of the downloads are never
consulted (Debian's copies of the files are recompressed, so their gzip bytes differ; the
decoded arrays do not). The examples keep TFDS's keys (0..N-1 in file order), so TFDS stores
them in the order its own builder would.
"""

import contextlib
import gzip
import io
import os
import struct
import subprocess

import numpy as np

from clead_jax.errors import UserError

FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
DEBIAN_PACKAGE = "dataset-fashion-mnist"
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path):
  """An IDX file (LeCun's format; gzipped if the name ends in .gz) as a numpy array."""
  opener = gzip.open if str(path).endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      data = f.read()
  except (OSError, EOFError) as e:
    raise UserError(f"{path} cannot be read ({e}); pass the directory that holds the four "
                    "original IDX files") from None
  zero, type_code, ndim = struct.unpack(">HBB", data[:4]) if len(data) >= 4 else (1, 0, 0)
  if zero != 0 or type_code not in _IDX_TYPES:
    raise UserError(f"{path} is not an IDX file (magic bytes {data[:4]!r})")
  shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
  dtype = np.dtype(_IDX_TYPES[type_code])
  offset = 4 + 4 * ndim
  count = int(np.prod(shape))
  if len(data) - offset != count * dtype.itemsize:
    raise UserError(f"{path} is truncated: shape {shape} needs {count * dtype.itemsize} bytes of "
                    f"data, it has {len(data) - offset}")
  return np.frombuffer(data, dtype, count, offset).reshape(shape)


def write_idx(path, array):
  """Writes a uint8 array as a gzipped IDX file (for tests and for small datasets)."""
  array = np.ascontiguousarray(array, np.uint8)
  header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + array.tobytes())


def _idx_file(directory, name):
  """DIR/name, or DIR/name without .gz when only the uncompressed file is there."""
  path = os.path.join(directory, name)
  if not os.path.exists(path) and os.path.exists(path.removesuffix(".gz")):
    return path.removesuffix(".gz")
  return path


def read_fashion_mnist_split(directory, split):
  """(images (N, 28, 28, 1) uint8, labels (N,) int64) of a split, decoded from the IDX files
  (gzipped or not)."""
  image_file, label_file = (_idx_file(directory, f) for f in FASHION_MNIST_FILES[split])
  images = read_idx(image_file)
  labels = read_idx(label_file)
  if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
    raise UserError(f"{image_file} holds {images.shape} {images.dtype} "
                    "images; Fashion-MNIST's are 28x28 uint8")
  if labels.shape != images.shape[:1]:
    raise UserError(f"{label_file} has {labels.shape[0]} labels for "
                    f"{images.shape[0]} images")
  return images[..., None], labels.astype(np.int64)


def debian_directory():
  """Where Debian's dataset-fashion-mnist installed the IDX files, or None."""
  try:
    listed = subprocess.run(["dpkg", "-L", DEBIAN_PACKAGE], capture_output=True, text=True,
                            check=False).stdout.splitlines()
  except OSError:
    return None
  for path in listed:
    if path.endswith(FASHION_MNIST_FILES["train"][0]):
      return os.path.dirname(path)
  return None


def find_source(directory):
  """The IDX directory: `directory`, or Debian's package's when None; a UserError if neither."""
  if directory is None:
    directory = debian_directory()
    if directory is None:
      raise UserError("no --from directory given and Debian's package "
                      f"{DEBIAN_PACKAGE} is not installed; install it (apt-get install "
                      f"{DEBIAN_PACKAGE}) or pass --from DIR holding "
                      + ", ".join(f for pair in FASHION_MNIST_FILES.values() for f in pair))
  missing = [f for pair in FASHION_MNIST_FILES.values() for f in pair
             if not os.path.exists(_idx_file(directory, f))]
  if missing:
    raise UserError(f"--from {directory}: missing {', '.join(missing)}; pass the directory that "
                    "holds the four original Fashion-MNIST IDX files (gzipped or not)")
  return directory


def _builder_class():
  """TFDS's FashionMNIST builder, reading local files (not registered: the name stays TFDS's)."""
  from tensorflow_datasets.image_classification import mnist  # pylint: disable=g-import-not-at-top

  class LocalFashionMNIST(mnist.FashionMNIST, skip_registration=True):
    """fashion_mnist with TFDS's info and version, its examples from local IDX files."""
    name = "fashion_mnist"

    def __init__(self, *, idx_dir, **kwargs):
      self._idx_dir = idx_dir
      super().__init__(**kwargs)

    def _split_generators(self, dl_manager):
      del dl_manager  # nothing is downloaded
      return {split: self._generate_examples(split) for split in FASHION_MNIST_FILES}

    def _generate_examples(self, split):  # pylint: disable=arguments-renamed
      images, labels = read_fashion_mnist_split(self._idx_dir, split)
      for index in range(len(labels)):
        yield index, {"image": images[index], "label": labels[index]}

  return LocalFashionMNIST


def prepare_fashion_mnist(source_directory, data_dir):
  """Prepares TFDS `fashion_mnist` in `data_dir` from the IDX files in `source_directory`.

  Returns the version directory written, or the existing one if it was prepared already.
  """
  from clead_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  tfds = input_pipeline.import_tfds()
  # Decode first, so that a bad file is one clear error before TFDS writes anything.
  for split in FASHION_MNIST_FILES:
    read_fashion_mnist_split(source_directory, split)
  builder = _builder_class()(idx_dir=source_directory, data_dir=data_dir)
  if builder.is_prepared():
    return builder.data_dir
  with contextlib.redirect_stdout(io.StringIO()):  # TFDS prints its own progress lines
    builder.download_and_prepare(
        download_dir=os.path.join(data_dir, "downloads"),
        download_config=tfds.download.DownloadConfig(
            try_download_gcs=False, compute_stats=tfds.download.ComputeStatsMode.SKIP))
  return builder.data_dir


def tfds_order(num_examples, split):
  """The order TFDS stores a split's examples in: sorted by the hash of their key, salted with
  the split name. as_dataset(split)[j] is the example of key tfds_order(n, split)[j]."""
  from tensorflow_datasets.core import hashing  # pylint: disable=g-import-not-at-top
  hasher = hashing.Hasher(split)
  return np.array(sorted(range(num_examples), key=hasher.hash_key), np.int64)


PREPARERS = {"fashion_mnist": prepare_fashion_mnist}
