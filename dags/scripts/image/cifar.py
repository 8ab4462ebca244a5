"""CIFAR-10 in its publisher's formats: the official python tarball ``cifar-10-python.tar.gz``
(pickled batches, rows of 3072 bytes in CHW order), or an ImageFolder tree as a tarball or a
directory (``folder``). A tarball's format is told by its content, not its name; it is read member
by member in one streaming pass, nothing extracted to disk.

The batches are pickles, and a pickle can run any code it names: only numpy's array rebuilders
and ``codecs.encode`` are allowed. Batch data must be uint8 rows of 3072 bytes; labels must be
integer class ids in 0..9 (a float, a bool, a label beyond 64 bits is named, never truncated).
Errors name the tarball and member (``archive!member``).
"""

from __future__ import annotations

import codecs
import io
import pickle
import tarfile
import zlib
from pathlib import Path, PurePosixPath

import numpy as np

from scripts.core import paths
from scripts.core.errors import DataSourceError, DataValidationError
from scripts.core.sources import fetch
from scripts.image import folder
from scripts.image.base import N_CLASSES, SHAPES, ImageArrays, check_labels

CIFAR_PYTHON_PATH = "cifar10/cifar-10-python.tar.gz"
CIFAR_URLS = ["https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"]
CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_BATCH = "test_batch"
CIFAR_META = "batches.meta"
CIFAR_MEMBERS = (*CIFAR_TRAIN_BATCHES, CIFAR_TEST_BATCH, CIFAR_META)


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


def read_cifar_tarball(path: Path) -> tuple[ImageArrays, str]:
    """A python-format or ImageFolder tarball, read member by member (nothing extracted to disk)."""
    python_members: dict[str, tuple[str, bytes]] = {}
    images = folder.FolderCollector(SHAPES["cifar10"])
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
                elif (key := folder.image_key(member.name)) is not None:
                    images.add(key, _read_member(tar, member), name)
    except (tarfile.ReadError, EOFError, OSError, zlib.error) as exc:
        # PIL's errors are converted inside decode_image, so an OSError here is the archive's.
        raise DataValidationError(path, f"not a readable tarball (truncated or corrupt?): {exc}") from None
    if python_members and len(images):
        raise DataValidationError(path, "holds both CIFAR python batches and ImageFolder images")
    if python_members:
        return _from_python_batches(python_members, path), "cifar-python"
    if len(images):
        return images.arrays(path), "imagefolder"
    raise DataValidationError(path, "holds neither CIFAR python batches (cifar-10-batches-py/) "
                              "nor an ImageFolder tree <root>/{train,test}/<class>/*.jpg|png")


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    fh = tar.extractfile(member)
    if fh is None:  # cannot happen for a regular file; keeps the type checker honest
        raise tarfile.ReadError(f"cannot read member {member.name}")
    return fh.read()


def read_cifar(source: Path) -> tuple[ImageArrays, str]:
    """``source`` by content: a directory is an ImageFolder tree, a file a tarball of either kind."""
    if source.is_dir():
        return folder.read_image_folder(source, SHAPES["cifar10"]), "imagefolder"
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
