"""MNIST in its publisher's format: the four gzipped IDX files (``train-images-idx3-ubyte.gz`` ...).

IDX must declare unsigned bytes, so pixels are 0..255 by construction; the header's magic number
and dims are checked against the file length (a truncated file or trailing bytes name the file),
a corrupt gzip names the file instead of a bare EOF, and every label must lie in 0..9.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from scripts.core import paths
from scripts.core.errors import DataSourceError, DataValidationError
from scripts.core.sources import fetch
from scripts.image.base import N_CLASSES, SHAPES, SPLITS, ImageArrays, check_labels

MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
# torchvision's copy first: yann.lecun.com has been unreliable for years.
MNIST_URL_BASES = [
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
]
MNIST_CLASSES = tuple(str(digit) for digit in range(N_CLASSES))
IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dims
IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dim


def read_gzip(path: Path) -> bytes:
    """The decompressed bytes; a truncated or corrupt gzip names the file instead of a bare EOF."""
    if path.suffix != ".gz":
        return path.read_bytes()  # an already-decompressed IDX file is the same format
    try:
        with gzip.open(path, "rb") as fh:
            return fh.read()
    except (EOFError, OSError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise DataValidationError(path, f"not a readable gzip file (truncated or corrupt?): {exc}") from None


def parse_idx(raw: bytes, name: str | Path, magic: int) -> np.ndarray:
    """An IDX array of unsigned bytes, its header checked against ``magic`` and the file length."""
    ndim = magic & 0xFF
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DataValidationError(name, f"{len(raw)} bytes, shorter than the {header_len}-byte header",
                                  field="header")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise DataValidationError(name, f"magic number 0x{found:08x}, expected 0x{magic:08x} "
                                  f"(uint8 IDX with {ndim} dims)", field="magic")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header_len + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        kind = "truncated" if len(raw) < expected else "trailing bytes"
        raise DataValidationError(
            name, f"{kind}: header says dims {dims} = {expected} bytes, file has {len(raw)}",
            field="length")
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(dims)


def read_mnist(directory: Path) -> tuple[ImageArrays, dict[str, str]]:
    """The four IDX files in ``directory`` (``.gz`` or already decompressed) as arrays.

    Also returns each split's labels file, for errors found later (a class missing from a split).
    """
    files: dict[str, Path] = {}
    for key, filename in MNIST_FILES.items():
        candidates = [directory / filename, directory / filename.removesuffix(".gz")]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise DataSourceError(f"{directory} has no {filename} (the four official MNIST files)")
        files[key] = found
    height, width, _ = SHAPES["mnist"]
    split_arrays = []
    for split in SPLITS:
        images_path, labels_path = files[f"{split}_images"], files[f"{split}_labels"]
        images = parse_idx(read_gzip(images_path), images_path, IDX_IMAGES_MAGIC)
        labels = parse_idx(read_gzip(labels_path), labels_path, IDX_LABELS_MAGIC)
        if images.shape[1:] != (height, width):
            raise DataValidationError(images_path, f"images are {images.shape[1]}x{images.shape[2]}, "
                                      f"expected {height}x{width}", field="dims")
        if len(images) != len(labels):
            raise DataValidationError(
                labels_path, f"{len(labels)} labels for {len(images)} images in {images_path.name}",
                field="dims")
        check_labels(labels, labels_path, field="labels")
        split_arrays += [images[..., np.newaxis], labels.astype(np.int64)]
    labels_files = {split: str(files[f"{split}_labels"]) for split in SPLITS}
    return ImageArrays(*split_arrays, classes=MNIST_CLASSES), labels_files


def fetch_mnist() -> Path:
    """The folder holding the four official files: the mirror's ``mnist/`` or the download cache."""
    fetched = [
        fetch(f"mnist/{filename}", [base + filename for base in MNIST_URL_BASES],
              paths.data_dir() / "raw", paths.data_mirror())
        for filename in MNIST_FILES.values()
    ]
    return fetched[0].parent
