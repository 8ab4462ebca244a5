"""MNIST and CIFAR-10: fetch, validate, and write an immutable snapshot of uint8 arrays.

The readers of each publisher's format are their own modules (layout: ../shared/data/README.md):
``idx`` (MNIST's four gzipped IDX files), ``cifar`` (the official python tarball, or an ImageFolder
tarball or directory, told by content) and ``folder`` (ImageFolder trees). This module holds what
comes after any of them:

* :func:`validate`, the contract every trainer relies on whatever the format was: exactly 10
  classes, uint8 images of the data set's shape, integer labels in 0..9, every class in both
  splits. Every deviation stops the run with a :class:`DataValidationError` naming the file and,
  inside an archive, the member (``archive!member``);
* the snapshot: ``<root>/<data_version>/arrays.npz`` (x_train, y_train, x_test, y_test, classes)
  plus ``manifest.json``; the version is a hash of the arrays themselves, so the same images give
  the same version whichever format or mirror they came from, and an existing version is reused,
  never rewritten;
* :func:`prepare` and :func:`load_snapshot`, the entry points of the pipeline and the benchmarks.

CLI (from dags/): ``python -m scripts.image.cli --dataset {mnist|cifar10} --steps prepare
[--source PATH] [--out DIR]`` prints the snapshot as JSON.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from scripts.core import paths, snapshots
from scripts.core.errors import DataSourceError, DataValidationError, ParameterError
from scripts.image import cifar, idx
from scripts.image.base import DATASETS, N_CLASSES, SHAPES, ImageArrays, check_labels

log = logging.getLogger(__name__)

SNAPSHOT_FILE = "arrays.npz"
MANIFEST_FILE = snapshots.MANIFEST_FILE


@dataclass(frozen=True)
class ImageSnapshot:
    """What :func:`prepare` wrote: a location and a version, never data (as a dict, the pipeline's
    ``Snapshot`` XCom)."""

    uri: str
    data_version: str
    dataset: str
    n_train: int
    n_test: int
    source: str

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def validate(arrays: ImageArrays, dataset: str, where: str | Path,
             where_split: dict[str, str] | None = None) -> None:
    """The contract every trainer relies on, whatever the input format was.

    ``where`` names the source in errors; ``where_split`` the file of each split's labels, when
    they come from different files (MNIST).
    """
    shape = SHAPES[dataset]
    if len(arrays.classes) != N_CLASSES or len(set(arrays.classes)) != N_CLASSES:
        raise DataValidationError(where, f"{len(set(arrays.classes))} distinct classes "
                                  f"{list(arrays.classes)}, expected {N_CLASSES}", field="classes")
    for split, x, y in (("train", arrays.x_train, arrays.y_train), ("test", arrays.x_test, arrays.y_test)):
        at = (where_split or {}).get(split, where)
        if x.dtype != np.uint8 or x.shape[1:] != shape:
            raise DataValidationError(at, f"{split} images are {x.dtype} {x.shape[1:]}, "
                                      f"expected uint8 {shape}", field=f"x_{split}")
        if len(x) != len(y):
            raise DataValidationError(at, f"{len(y)} {split} labels for {len(x)} images",
                                      field=f"y_{split}")
        if y.dtype.kind not in "iu":  # a NaN label passes both range comparisons
            raise DataValidationError(at, f"{split} labels are {y.dtype}, expected integers",
                                      field=f"y_{split}")
        check_labels(y, at, field=f"y_{split}")
        counts = np.bincount(y, minlength=N_CLASSES)
        absent = [arrays.classes[i] for i in np.flatnonzero(counts == 0)]
        if absent:
            raise DataValidationError(at, f"class(es) {', '.join(absent)} have no {split} images",
                                      field=f"y_{split}")


def content_version(dataset: str, arrays: ImageArrays) -> str:
    """A hash of the pixels, labels and class names (not of a file's bytes).

    Each array's shape goes in before its bytes: otherwise moving images from test to train
    would leave the concatenated bytes, and so the version, unchanged.
    """
    digest = hashlib.sha256()
    for key in ("x_train", "y_train", "x_test", "y_test"):
        array = np.ascontiguousarray(getattr(arrays, key))
        dtype = "<i8" if key.startswith("y") else "|u1"  # fixed byte order: same hash everywhere
        digest.update(f"{key}:{dtype}:{array.shape}".encode())
        digest.update(array.astype(dtype, copy=False).tobytes())
    digest.update("\n".join(arrays.classes).encode())
    return f"{dataset}-" + digest.hexdigest()[:16]


def class_counts(labels: np.ndarray, classes: tuple[str, ...]) -> dict[str, int]:
    counts = np.bincount(labels, minlength=len(classes))
    return {name: int(n) for name, n in zip(classes, counts, strict=True)}


def write_snapshot(arrays: ImageArrays, dataset: str, root: Path, source: str,
                   fmt: str = "") -> ImageSnapshot:
    """Write the snapshot once: a version that already exists is reused, never rewritten."""
    version = content_version(dataset, arrays)
    target = root / version
    manifest = {
        "data_version": version,
        "dataset": dataset,
        "source": source,
        "format": fmt,
        "n_train": len(arrays.y_train),
        "n_test": len(arrays.y_test),
        "shape": list(SHAPES[dataset]),
        "classes": list(arrays.classes),
        "class_counts_train": class_counts(arrays.y_train, arrays.classes),
        "class_counts_test": class_counts(arrays.y_test, arrays.classes),
    }
    # Uncompressed: loading is a plain read, and these pixels barely compress anyway.
    snapshots.write_once(target, manifest, lambda folder: np.savez(
        folder / SNAPSHOT_FILE, x_train=arrays.x_train, y_train=arrays.y_train, x_test=arrays.x_test,
        y_test=arrays.y_test, classes=np.array(arrays.classes)))
    return ImageSnapshot(uri=str(target), data_version=version, dataset=dataset,
                         n_train=manifest["n_train"], n_test=manifest["n_test"], source=source)


def load_snapshot(uri: str) -> ImageArrays:
    """The arrays of a snapshot written by :func:`prepare` (no pickle: classes are a str array)."""
    with np.load(Path(uri) / SNAPSHOT_FILE, allow_pickle=False) as npz:
        return ImageArrays(
            x_train=npz["x_train"], y_train=npz["y_train"], x_test=npz["x_test"], y_test=npz["y_test"],
            classes=tuple(str(c) for c in npz["classes"]))


def prepare(dataset: str, source: Path | None = None, out_root: Path | None = None) -> ImageSnapshot:
    """Fetch (mirror or download) or read ``source``, validate, and snapshot ``dataset``."""
    if dataset not in DATASETS:
        raise ParameterError(f"dataset must be one of {DATASETS}, not {dataset!r}")
    started = time.perf_counter()
    if dataset == "mnist":
        directory = Path(source) if source is not None else idx.fetch_mnist()
        if not directory.is_dir():
            raise DataSourceError(f"MNIST source {directory} is not a directory holding the four "
                                  "official IDX files")
        (arrays, where_split), fmt, where = idx.read_mnist(directory), "idx", str(directory)
    else:
        path = Path(source) if source is not None else cifar.fetch_cifar()
        (arrays, fmt), where, where_split = cifar.read_cifar(path), str(path), None
    validate(arrays, dataset, where, where_split)
    read_seconds = time.perf_counter() - started
    out_root = out_root or paths.data_dir() / dataset / "snapshots"
    snapshot = write_snapshot(arrays, dataset, out_root, source=where, fmt=fmt)
    log.info("%s snapshot %s: %d train + %d test images from %s (%s, read in %.1f s, total %.1f s)",
             dataset, snapshot.data_version, snapshot.n_train, snapshot.n_test, where, fmt,
             read_seconds, time.perf_counter() - started)
    return snapshot
