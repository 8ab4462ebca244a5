"""Small, learnable image data sets in the official layouts, for end-to-end tests: each class is
a bright square at its own position plus noise, so a CNN learns it in a few smoke epochs."""

from __future__ import annotations

import gzip
import tarfile
from pathlib import Path

import numpy as np

from scripts.image import idx
from tests.test_image_data import CIFAR_CLASSES, add_member, encode, idx_bytes


def learnable(n: int, shape: tuple[int, int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    images = rng.integers(0, 60, (n, *shape), dtype=np.uint8)
    for i, label in enumerate(labels):
        y, x = 4 + 6 * (label // 4), 4 + 6 * (label % 4)
        images[i, y:y + 6, x:x + 6, :] = 200 + rng.integers(0, 55)
    return images, labels.astype(np.uint8)


def write_mnist_mirror(mirror: Path, n_train: int = 1000, n_test: int = 200) -> Path:
    folder = mirror / "mnist"
    folder.mkdir(parents=True, exist_ok=True)
    x_train, y_train = learnable(n_train, (28, 28, 1), 1)
    x_test, y_test = learnable(n_test, (28, 28, 1), 2)
    arrays = {"train_images": x_train[..., 0], "train_labels": y_train,
              "test_images": x_test[..., 0], "test_labels": y_test}
    for key, filename in idx.MNIST_FILES.items():
        (folder / filename).write_bytes(gzip.compress(idx_bytes(arrays[key])))
    return mirror


def write_cifar_mirror(mirror: Path, n_train: int = 1000, n_test: int = 200) -> Path:
    """An ImageFolder tarball of PNGs, like the mirror's cifar10-jpeg.tar.gz."""
    folder = mirror / "cifar10"
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(folder / "cifar10-synthetic.tar.gz", "w:gz") as tar:
        for split, n, seed in (("train", n_train, 3), ("test", n_test, 4)):
            images, labels = learnable(n, (32, 32, 3), seed)
            for i, (pixels, label) in enumerate(zip(images, labels, strict=True)):
                add_member(tar, f"cifar10-synthetic/{split}/{CIFAR_CLASSES[label]}/{i:04d}.png",
                           encode(pixels, "PNG"))
    return mirror
