"""MNIST and CIFAR-10: fetch, validate, and write an immutable snapshot of uint8 arrays.

Accepted inputs, all in their publishers' formats (layout: ../shared/data/README.md):

* MNIST: the four official gzipped IDX files (``train-images-idx3-ubyte.gz`` ...), from the
  mirror, a download, or a directory given as ``source``.
* CIFAR-10: the official python tarball ``cifar-10-python.tar.gz`` (pickled batches, rows of 3072
  bytes in CHW order), or an ImageFolder tree ``<root>/{train,test}/<class>/*.jpg|*.png`` as a
  tarball or a directory. Class names sorted alphabetically are the label ids, which for CIFAR-10
  are the standard ids 0-9. A tarball's format is told by its content, not its name.

Every deviation (IDX magic or dims, a file shorter than its header says, a corrupt gzip or
tarball, an image that does not decode, has the wrong size or pixels that are not 8-bit, a label
that is not an integer or lies outside 0..9, a class missing from a split, not exactly 10 classes)
stops the run with a :class:`DataValidationError` naming the file and, inside an archive, the
member (``archive!member``). Pixels are uint8 everywhere, so 0..255 holds by construction: IDX
and CIFAR batches must declare unsigned bytes, and a 16-bit or float image (a 16-bit grayscale
PNG, which PIL would clip to 255 when converting) is refused rather than converted.

The snapshot is ``<root>/<data_version>/arrays.npz`` (x_train, y_train, x_test, y_test, classes)
plus ``manifest.json``; the version is a hash of the arrays themselves, so the same images give
the same version whichever format or mirror they came from, and an existing version is reused,
never rewritten.

CLI (from dags/): ``python -m scripts.image.data {mnist|cifar10} [--source PATH] [--out DIR]``
prints the snapshot as JSON.
"""

from __future__ import annotations

import argparse
import codecs
import gzip
import hashlib
import io
import json
import logging
import os
import pickle
import tarfile
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from scripts.core import paths, snapshots
from scripts.core.errors import DataSourceError, DataValidationError, ParameterError
from scripts.core.sources import fetch
from scripts.image.base import ImageArrays

log = logging.getLogger(__name__)

DATASETS = ("mnist", "cifar10")
SHAPES: dict[str, tuple[int, int, int]] = {"mnist": (28, 28, 1), "cifar10": (32, 32, 3)}
N_CLASSES = 10

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

CIFAR_PYTHON_PATH = "cifar10/cifar-10-python.tar.gz"
CIFAR_URLS = ["https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"]
CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_BATCH = "test_batch"
CIFAR_META = "batches.meta"
CIFAR_MEMBERS = (*CIFAR_TRAIN_BATCHES, CIFAR_TEST_BATCH, CIFAR_META)

SPLITS = ("train", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
IMAGE_FORMATS = ("JPEG", "PNG")  # PIL tries only these: faster, and nothing exotic slips through
# PIL modes whose channels are 8-bit (0..255). Others ("I;16", "I", "F": 16-bit PNGs) would be
# clipped, not scaled, by ``convert``: an image of saturated pixels that still parses.
EIGHT_BIT_MODES = frozenset({"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK",
                             "YCbCr"})

SNAPSHOT_FILE = "arrays.npz"
MANIFEST_FILE = snapshots.MANIFEST_FILE


@dataclass(frozen=True)
class ImageSnapshot:
    """What ``prepare`` hands to later tasks through XCom: a location and a version, never data."""

    uri: str
    data_version: str
    dataset: str
    n_train: int
    n_test: int
    source: str

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# MNIST: gzipped IDX files
# ---------------------------------------------------------------------------------------------


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
    paths: dict[str, Path] = {}
    for key, filename in MNIST_FILES.items():
        candidates = [directory / filename, directory / filename.removesuffix(".gz")]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise DataSourceError(f"{directory} has no {filename} (the four official MNIST files)")
        paths[key] = found
    height, width, _ = SHAPES["mnist"]
    split_arrays = []
    for split in SPLITS:
        images_path, labels_path = paths[f"{split}_images"], paths[f"{split}_labels"]
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
    labels_files = {split: str(paths[f"{split}_labels"]) for split in SPLITS}
    return ImageArrays(*split_arrays, classes=MNIST_CLASSES), labels_files


def check_labels(labels: np.ndarray, name: str | Path, field: str) -> None:
    """Every label in 0..9, checked where it was read so the error names that file or member."""
    bad = np.flatnonzero((labels < 0) | (labels >= N_CLASSES))
    if len(bad):
        raise DataValidationError(name, f"label {int(labels[bad[0]])} at index {int(bad[0])} outside "
                                  f"0..{N_CLASSES - 1} ({len(bad)} such)", field=field)


def fetch_mnist() -> Path:
    """The folder holding the four official files: the mirror's ``mnist/`` or the download cache."""

    fetched = [
        fetch(f"mnist/{filename}", [base + filename for base in MNIST_URL_BASES],
              paths.data_dir() / "raw", paths.data_mirror())
        for filename in MNIST_FILES.values()
    ]
    return fetched[0].parent


# ---------------------------------------------------------------------------------------------
# CIFAR-10: the official python tarball, or an ImageFolder tree (tarball or directory)
# ---------------------------------------------------------------------------------------------


def _pickle_globals() -> dict[tuple[str, str], object]:
    """The only globals a CIFAR batch pickle may name: numpy's array rebuilders and codecs.encode."""
    allowed: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # how Python 3 writes bytes in a protocol-2 pickle
    }
    # numpy's helpers moved (numpy.core -> numpy._core); pickles name either spelling.
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = np.ndarray(0).__reduce__()[0]
        allowed[(f"{package}.multiarray", "scalar")] = np.int64(0).__reduce__()[0]
        allowed[(f"{package}.numeric", "_frombuffer")] = np.ndarray(0).__reduce_ex__(5)[0]
    return allowed


class _BatchUnpickler(pickle.Unpickler):
    """Loads only what a CIFAR batch holds (dicts, lists, bytes, numpy arrays).

    The official format is pickle, and a pickle can run any code it names; a data file must not,
    so every global outside :func:`_pickle_globals` is refused.
    """

    ALLOWED = _pickle_globals()

    def find_class(self, module: str, name: str) -> object:
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}") from None


def _unpickle_batch(data: bytes, name: str) -> dict[str, object]:
    """A batch dict with ``str`` keys (the official pickles come from Python 2: bytes keys)."""
    try:
        obj = _BatchUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as exc:  # unpickling fails in many ways; all of them mean a bad member
        raise DataValidationError(name, f"not a readable CIFAR batch pickle: {exc!r}") from None
    if not isinstance(obj, dict):
        raise DataValidationError(name, f"batch is a {type(obj).__name__}, expected a dict")
    return {(k.decode() if isinstance(k, bytes) else str(k)): v for k, v in obj.items()}


def _batch_arrays(batch: dict[str, object], name: str) -> tuple[np.ndarray, np.ndarray]:
    """One batch's images (N, 32, 32, 3) HWC and labels."""
    height, width, channels = SHAPES["cifar10"]
    if "data" not in batch or "labels" not in batch:
        raise DataValidationError(name, f"batch has keys {sorted(batch)}, expected 'data' and 'labels'")
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != channels * height * width:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataValidationError(name, f"data is {desc}, expected uint8 (N, {channels * height * width})",
                                  field="data")
    labels = _label_array(batch["labels"], name)
    if labels.shape != (len(data),):
        raise DataValidationError(name, f"{labels.size} labels for {len(data)} images", field="labels")
    check_labels(labels, name, field="labels")
    # Rows are the red plane, then green, then blue (CHW); the contract is HWC.
    images = np.ascontiguousarray(data.reshape(-1, channels, height, width).transpose(0, 2, 3, 1))
    return images, labels


def _label_array(values: object, name: str) -> np.ndarray:
    """A batch's labels as int64: a list of Python ints (the official format) or an integer array.

    ``np.asarray(..., dtype=np.int64)`` alone would truncate a float label (3.7 -> 3), turn a bool
    into 0/1, and wrap or refuse a label too large for 64 bits; each of these is named instead.
    """
    if isinstance(values, np.ndarray):
        if values.dtype.kind not in "iu":
            raise DataValidationError(name, f"labels are a {values.dtype} array, expected integers",
                                      field="labels")
        check_labels(values, name, field="labels")  # before the cast: a uint64 could wrap
        return values.astype(np.int64)
    if not isinstance(values, list | tuple):
        raise DataValidationError(name, f"labels are a {type(values).__name__}, expected a list of "
                                  "integers", field="labels")
    for i, value in enumerate(values):
        if isinstance(value, bool | np.bool_) or not isinstance(value, int | np.integer):
            raise DataValidationError(name, f"label {value!r} at index {i} is not an integer",
                                      field="labels")
    outside = [i for i, value in enumerate(values) if not 0 <= value < N_CLASSES]
    if outside:
        raise DataValidationError(name, f"label {values[outside[0]]} at index {outside[0]} outside "
                                  f"0..{N_CLASSES - 1} ({len(outside)} such)", field="labels")
    return np.asarray(values, dtype=np.int64)


def _from_python_batches(members: dict[str, tuple[str, bytes]], archive: Path) -> ImageArrays:
    missing = [m for m in CIFAR_MEMBERS if m not in members]
    if missing:
        raise DataValidationError(archive, f"CIFAR python tarball lacks {', '.join(missing)}")
    meta_name, meta_raw = members[CIFAR_META]
    meta = _unpickle_batch(meta_raw, meta_name)
    names = meta.get("label_names")
    if not isinstance(names, list | tuple):
        raise DataValidationError(meta_name, "no label_names list", field="label_names")
    classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    splits = []
    for batch_names in (CIFAR_TRAIN_BATCHES, (CIFAR_TEST_BATCH,)):
        parts = [_batch_arrays(_unpickle_batch(members[b][1], members[b][0]), members[b][0])
                 for b in batch_names]
        splits += [np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])]
    return ImageArrays(*splits, classes=classes)


def _imagefolder_key(relative: str) -> tuple[str, str, str] | None:
    """``(split, class, file)`` for ``.../{train,test}/<class>/<file>.jpg|png``; None: not an image.

    Hidden files (``.DS_Store``, macOS ``._x.jpg`` resource forks) are not images of the set.
    """
    parts = PurePosixPath(relative).parts
    if not parts or parts[-1].startswith(".") or not parts[-1].lower().endswith(IMAGE_SUFFIXES):
        return None
    if len(parts) < 3 or parts[-3] not in SPLITS:
        return ("", "", "")  # an image outside the layout: the caller rejects it
    return parts[-3], parts[-2], parts[-1]


def decode_image(data: bytes, name: str, shape: tuple[int, int, int]) -> np.ndarray:
    """A JPEG/PNG as uint8 (H, W, C); anything PIL cannot decode names the file or member."""
    height, width, channels = shape
    mode = "RGB" if channels == 3 else "L"
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as img:
            img.load()  # decode now: a truncated image fails here, not later in training
            found = img.mode
            pixels = None if found not in EIGHT_BIT_MODES else np.asarray(
                img if img.mode == mode else img.convert(mode))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataValidationError(name, f"not a readable JPEG/PNG image ({exc})") from None
    if pixels is None:
        raise DataValidationError(name, f"pixels are not 8-bit (PIL mode {found!r}): only 0..255 "
                                  "images are accepted; converting would clip them", field="mode")
    if pixels.shape[:2] != (height, width):
        raise DataValidationError(name, f"image is {pixels.shape[1]}x{pixels.shape[0]}, "
                                  f"expected {width}x{height}")
    return pixels.reshape(height, width, channels)


class _FolderCollector:
    """Gathers decoded ImageFolder images, then orders them by (class, file name) per split.

    Sorting makes the arrays, and so the data version, independent of the order in which a tar
    or a file system lists them.
    """

    def __init__(self, shape: tuple[int, int, int]) -> None:
        self.shape = shape
        self.items: dict[str, list[tuple[str, str, np.ndarray]]] = {s: [] for s in SPLITS}

    def add(self, key: tuple[str, str, str], data: bytes, name: str) -> None:
        split, cls, filename = key
        if not split:
            raise DataValidationError(name, "image outside the ImageFolder layout "
                                      "<root>/{train,test}/<class>/<file>")
        self.items[split].append((cls, filename, decode_image(data, name, self.shape)))

    def __len__(self) -> int:
        return sum(len(v) for v in self.items.values())

    def arrays(self, where: str | Path) -> ImageArrays:
        found = {s: sorted({c for c, _, _ in self.items[s]}) for s in SPLITS}
        classes = sorted(set(found["train"]) | set(found["test"]))
        for split in SPLITS:
            absent = [c for c in classes if c not in found[split]]
            if absent:
                raise DataValidationError(where, f"class(es) {', '.join(absent)} have no {split} images")
        ids = {c: i for i, c in enumerate(classes)}
        out: list[np.ndarray] = []
        for split in SPLITS:
            entries = sorted(self.items[split], key=lambda item: (item[0], item[1]))
            out.append(np.stack([e[2] for e in entries]) if entries
                       else np.empty((0, *self.shape), np.uint8))
            out.append(np.array([ids[e[0]] for e in entries], dtype=np.int64))
        return ImageArrays(*out, classes=tuple(classes))


def read_cifar_tarball(path: Path) -> tuple[ImageArrays, str]:
    """A python-format or ImageFolder tarball, read member by member (nothing extracted to disk)."""
    python_members: dict[str, tuple[str, bytes]] = {}
    folder = _FolderCollector(SHAPES["cifar10"])
    try:
        # Stream mode ("r|*"): one sequential pass through the gzip, any compression.
        with tarfile.open(path, "r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = f"{path}!{member.name}"
                base = PurePosixPath(member.name).name
                if base in CIFAR_MEMBERS:
                    python_members[base] = (name, _read_member(tar, member))
                elif (key := _imagefolder_key(member.name)) is not None:
                    folder.add(key, _read_member(tar, member), name)
    except (tarfile.ReadError, EOFError, OSError, zlib.error) as exc:
        # PIL's errors are converted inside decode_image, so an OSError here is the archive's.
        raise DataValidationError(path, f"not a readable tarball (truncated or corrupt?): {exc}") from None
    if python_members and len(folder):
        raise DataValidationError(path, "holds both CIFAR python batches and ImageFolder images")
    if python_members:
        return _from_python_batches(python_members, path), "cifar-python"
    if len(folder):
        return folder.arrays(path), "imagefolder"
    raise DataValidationError(path, "holds neither CIFAR python batches (cifar-10-batches-py/) "
                              "nor an ImageFolder tree <root>/{train,test}/<class>/*.jpg|png")


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    fh = tar.extractfile(member)
    if fh is None:  # cannot happen for a regular file; keeps the type checker honest
        raise tarfile.ReadError(f"cannot read member {member.name}")
    return fh.read()


def read_image_folder(root: Path, shape: tuple[int, int, int]) -> ImageArrays:
    """An ImageFolder directory (``root`` may be the tree itself or the folder above it)."""
    folder = _FolderCollector(shape)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for filename in sorted(filenames):
            path = Path(dirpath) / filename
            key = _imagefolder_key(path.relative_to(root).as_posix())
            if key is not None:
                folder.add(key, path.read_bytes(), str(path))
    if not len(folder):
        raise DataValidationError(root, "no images in an ImageFolder layout "
                                  "<root>/{train,test}/<class>/*.jpg|png")
    return folder.arrays(root)


def read_cifar(source: Path) -> tuple[ImageArrays, str]:
    """``source`` by content: a directory is an ImageFolder tree, a file a tarball of either kind."""
    if source.is_dir():
        return read_image_folder(source, SHAPES["cifar10"]), "imagefolder"
    if not source.is_file():
        raise DataSourceError(f"{source} does not exist")
    return read_cifar_tarball(source)


def fetch_cifar() -> Path:
    """The mirror's official python tarball, else its ImageFolder tarball; else download."""

    mirror = paths.data_mirror()
    if mirror is not None and not (mirror / CIFAR_PYTHON_PATH).is_file():
        tarballs = sorted((mirror / "cifar10").glob("*.tar.gz"))
        if not tarballs:
            raise DataSourceError(f"DATA_MIRROR={mirror} has no {CIFAR_PYTHON_PATH} "
                                  "nor any ImageFolder tarball cifar10/*.tar.gz")
        return tarballs[0]
    return fetch(CIFAR_PYTHON_PATH, CIFAR_URLS, paths.data_dir() / "raw", mirror)


# ---------------------------------------------------------------------------------------------
# Validation, version, snapshot
# ---------------------------------------------------------------------------------------------


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
        directory = Path(source) if source is not None else fetch_mnist()
        if not directory.is_dir():
            raise DataSourceError(f"MNIST source {directory} is not a directory holding the four "
                                  "official IDX files")
        (arrays, where_split), fmt, where = read_mnist(directory), "idx", str(directory)
    else:
        path = Path(source) if source is not None else fetch_cifar()
        (arrays, fmt), where, where_split = read_cifar(path), str(path), None
    validate(arrays, dataset, where, where_split)
    read_seconds = time.perf_counter() - started
    out_root = out_root or paths.data_dir() / dataset / "snapshots"
    snapshot = write_snapshot(arrays, dataset, out_root, source=where, fmt=fmt)
    log.info("%s snapshot %s: %d train + %d test images from %s (%s, read in %.1f s, total %.1f s)",
             dataset, snapshot.data_version, snapshot.n_train, snapshot.n_test, where, fmt,
             read_seconds, time.perf_counter() - started)
    return snapshot


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("dataset", choices=DATASETS)
    parser.add_argument("--source", type=Path,
                        help="MNIST: folder with the 4 IDX files; CIFAR-10: python or ImageFolder "
                             "tarball, or ImageFolder folder (default: mirror/download)")
    parser.add_argument("--out", type=Path, help="snapshot root (default: <data dir>/<dataset>/snapshots)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    print(json.dumps(prepare(args.dataset, args.source, args.out).to_dict()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
