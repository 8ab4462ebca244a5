"""MNIST / CIFAR-10 readers (idx, cifar, folder), validation and snapshots (data), on small files
in the official formats the tests write."""

from __future__ import annotations

import gzip
import io
import json
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scripts.core.errors import DataSourceError, DataValidationError
from scripts.image import cifar, cli, idx
from scripts.image import data as image_data
from scripts.image.base import ImageArrays
from tests.helpers import SHARED_DATA, serve_directory

CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# The official MNIST class counts (train, test).
MNIST_COUNTS = ([5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949],
                [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009])


# ---------------------------------------------------------------------------------------------
# Writers of small files in the publishers' formats
# ---------------------------------------------------------------------------------------------


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX: magic 0x0000 08 <ndim>, then each dim as a big-endian uint32, then the bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_mnist(directory: Path, n_train: int = 50, n_test: int = 20, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": (np.arange(n_train) % 10).astype(np.uint8),  # every digit present
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": (np.arange(n_test)[::-1] % 10).astype(np.uint8),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for key, filename in idx.MNIST_FILES.items():
        (directory / filename).write_bytes(gzip.compress(idx_bytes(arrays[key])))
    return arrays


@pytest.fixture
def mnist_dir(tmp_path) -> tuple[Path, dict[str, np.ndarray]]:
    directory = tmp_path / "mnist"
    return directory, write_mnist(directory)


def write_cifar_python(path: Path, per_batch: int = 10, seed: int = 0,
                       test_labels: object = None) -> dict[str, np.ndarray]:
    """The official tarball: cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}.

    Pickled like the originals (protocol 2, bytes keys, CHW rows of 3072 bytes, labels a list).
    ``test_labels`` replaces the test batch's labels (to write a broken file).
    """
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (6 * per_batch, 3072), dtype=np.uint8)
    labels = np.arange(6 * per_batch) % 10
    members = {"batches.meta": {b"label_names": [c.encode() for c in CIFAR_CLASSES],
                                b"num_cases_per_batch": per_batch, b"num_vis": 3072}}
    for i, name in enumerate([*cifar.CIFAR_TRAIN_BATCHES, cifar.CIFAR_TEST_BATCH]):
        rows = slice(i * per_batch, (i + 1) * per_batch)
        members[name] = {b"batch_label": f"batch {i}".encode(), b"data": data[rows],
                         b"labels": [int(v) for v in labels[rows]],
                         b"filenames": [f"img_{j}.png".encode() for j in range(per_batch)]}
    if test_labels is not None:
        members[cifar.CIFAR_TEST_BATCH][b"labels"] = test_labels
    with tarfile.open(path, "w:gz") as tar:
        for name, obj in members.items():
            add_member(tar, f"cifar-10-batches-py/{name}", pickle.dumps(obj, protocol=2))
    n_train = 5 * per_batch
    return {"x_train": data[:n_train], "y_train": labels[:n_train],
            "x_test": data[n_train:], "y_test": labels[n_train:]}


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def encode(pixels: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def folder_images(seed: int = 0, per_class: tuple[int, int] = (3, 1),
                  classes: tuple[str, ...] = CIFAR_CLASSES) -> dict[str, np.ndarray]:
    """``{split}/{class}/{NNNN}.png`` -> pixels; classes listed in reverse to test the sorting."""
    rng = np.random.default_rng(seed)
    images = {}
    for split, n in zip(("train", "test"), per_class, strict=True):
        for cls in reversed(classes):
            for i in range(n):
                images[f"{split}/{cls}/{i:04d}.png"] = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    return images


def write_folder(root: Path, images: dict[str, np.ndarray], fmt: str = "PNG") -> Path:
    for rel, pixels in images.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode(pixels, fmt))
    return root


def write_folder_tarball(path: Path, images: dict[str, np.ndarray], root: str = "cifar10-jpeg",
                         fmt: str = "PNG", extra: dict[str, bytes] | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for rel, pixels in images.items():
            name = f"{root}/{rel}".replace(".png", ".jpg" if fmt == "JPEG" else ".png")
            add_member(tar, name, encode(pixels, fmt))
        for name, data in (extra or {}).items():
            add_member(tar, name, data)
    return path


def expected_folder_arrays(images: dict[str, np.ndarray], split: str) -> tuple[np.ndarray, np.ndarray]:
    """What the loader must return: sorted by (class, file), labels = index in sorted classes."""
    keys = sorted(k for k in images if k.startswith(f"{split}/"))
    classes = sorted({k.split("/")[1] for k in images})
    return (np.stack([images[k] for k in keys]),
            np.array([classes.index(k.split("/")[1]) for k in keys], dtype=np.int64))


# ---------------------------------------------------------------------------------------------
# MNIST
# ---------------------------------------------------------------------------------------------


def test_mnist_idx_round_trips_exactly(tmp_path, mnist_dir):
    directory, written = mnist_dir
    snap = image_data.prepare("mnist", directory, tmp_path / "snaps")
    assert (snap.dataset, snap.n_train, snap.n_test) == ("mnist", 50, 20)
    assert snap.data_version.startswith("mnist-") and snap.source == str(directory)
    arrays = image_data.load_snapshot(snap.uri)
    assert arrays.x_train.shape == (50, 28, 28, 1) and arrays.x_train.dtype == np.uint8
    assert arrays.y_train.dtype == np.int64
    np.testing.assert_array_equal(arrays.x_train[..., 0], written["train_images"])
    np.testing.assert_array_equal(arrays.y_train, written["train_labels"])
    np.testing.assert_array_equal(arrays.x_test[..., 0], written["test_images"])
    np.testing.assert_array_equal(arrays.y_test, written["test_labels"])
    assert arrays.classes == tuple("0123456789")
    manifest = json.loads((Path(snap.uri) / image_data.MANIFEST_FILE).read_text())
    assert manifest["class_counts_train"] == {str(d): 5 for d in range(10)}
    assert manifest["class_counts_test"] == {str(d): 2 for d in range(10)}
    assert manifest["shape"] == [28, 28, 1] and manifest["n_test"] == 20


def test_truncated_idx_names_the_file(mnist_dir):
    directory, written = mnist_dir
    raw = idx_bytes(written["train_images"])
    path = directory / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(raw[:-100]))  # a valid gzip of a short file
    with pytest.raises(DataValidationError, match="truncated") as err:
        idx.read_mnist(directory)
    assert err.value.path == str(path) and err.value.field == "length"


def test_corrupt_gzip_names_the_file(mnist_dir):
    directory, _ = mnist_dir
    path = directory / "t10k-labels-idx1-ubyte.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # gzip cut in the middle: EOFError inside gzip
    with pytest.raises(DataValidationError, match="gzip") as err:
        idx.read_mnist(directory)
    assert err.value.path == str(path)
    path.write_bytes(b"not gzip at all" * 10)
    with pytest.raises(DataValidationError, match="gzip"):
        idx.read_mnist(directory)


def test_wrong_magic_names_the_file(mnist_dir):
    directory, written = mnist_dir
    path = directory / "train-labels-idx1-ubyte.gz"
    # Images where labels belong: a valid IDX file with the wrong magic (3 dims, not 1).
    path.write_bytes(gzip.compress(idx_bytes(written["train_images"])))
    with pytest.raises(DataValidationError, match="magic number 0x00000803") as err:
        idx.read_mnist(directory)
    assert (err.value.path, err.value.field) == (str(path), "magic")


def test_image_label_count_mismatch(mnist_dir):
    directory, written = mnist_dir
    path = directory / "train-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(written["train_labels"][:-1])))
    with pytest.raises(DataValidationError, match="49 labels for 50 images") as err:
        idx.read_mnist(directory)
    assert err.value.path == str(path)


def test_wrong_image_size(mnist_dir):
    directory, _ = mnist_dir
    path = directory / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((20, 32, 32), np.uint8))))
    with pytest.raises(DataValidationError, match="expected 28x28") as err:
        idx.read_mnist(directory)
    assert err.value.path == str(path)


@pytest.mark.parametrize("label", [10, 255])
def test_label_out_of_range(mnist_dir, label):
    directory, written = mnist_dir
    labels = written["test_labels"].copy()
    labels[7] = label
    path = directory / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(labels)))
    with pytest.raises(DataValidationError, match=f"label {label} at index 7 outside 0..9") as err:
        idx.read_mnist(directory)
    assert err.value.path == str(path) and err.value.field == "labels"


def test_missing_class_names_split_and_class(tmp_path, mnist_dir):
    directory, written = mnist_dir
    labels = written["test_labels"].copy()
    labels[labels == 3] = 4
    path = directory / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(labels)))
    with pytest.raises(DataValidationError, match="class.*3 have no test images") as err:
        image_data.prepare("mnist", directory, tmp_path / "snaps")
    assert err.value.path == str(path)
    assert not (tmp_path / "snaps").exists(), "nothing is written for invalid data"


# ---------------------------------------------------------------------------------------------
# CIFAR-10: python tarball, ImageFolder tree and tarball
# ---------------------------------------------------------------------------------------------


def test_cifar_python_tarball_chw_to_hwc(tmp_path):
    tarball = tmp_path / "cifar-10-python.tar.gz"
    written = write_cifar_python(tarball)
    snap = image_data.prepare("cifar10", tarball, tmp_path / "snaps")
    assert (snap.n_train, snap.n_test) == (50, 10)
    arrays = image_data.load_snapshot(snap.uri)
    assert arrays.x_train.shape == (50, 32, 32, 3) and arrays.x_train.dtype == np.uint8
    assert arrays.classes == CIFAR_CLASSES
    # Row layout: 1024 red, then 1024 green, then 1024 blue bytes, each row-major 32x32.
    row = written["x_train"][17]
    for h, w, c in [(0, 0, 0), (0, 1, 0), (1, 0, 0), (5, 7, 1), (31, 31, 2)]:
        assert arrays.x_train[17, h, w, c] == row[c * 1024 + h * 32 + w]
    np.testing.assert_array_equal(arrays.x_test.transpose(0, 3, 1, 2).reshape(10, -1), written["x_test"])
    np.testing.assert_array_equal(arrays.y_train, written["y_train"])
    np.testing.assert_array_equal(arrays.y_test, written["y_test"])
    manifest = json.loads((Path(snap.uri) / image_data.MANIFEST_FILE).read_text())
    assert manifest["format"] == "cifar-python"
    assert manifest["class_counts_train"] == dict.fromkeys(CIFAR_CLASSES, 5)


def ten(label: object, at: int = 3) -> list[object]:
    labels: list[object] = [i % 10 for i in range(10)]
    labels[at] = label
    return labels


@pytest.mark.parametrize("labels, message", [
    (ten(10), "label 10 at index 3 outside 0..9"),
    (ten(-1), "label -1 at index 3 outside 0..9"),
    (ten(2**70), f"label {2**70} at index 3 outside 0..9"),  # no 64-bit wrap-around
    (ten(2**64 - 1), f"label {2**64 - 1} at index 3 outside 0..9"),
    (ten(3.7), "label 3.7 at index 3 is not an integer"),  # np.int64 would truncate it to 3
    (ten(3.0), "label 3.0 at index 3 is not an integer"),
    (ten(float("nan")), "label nan at index 3 is not an integer"),
    (ten(float("inf")), "label inf at index 3 is not an integer"),
    (ten(True), "label True at index 3 is not an integer"),
    (ten(b"3"), "label b'3' at index 3 is not an integer"),
    (np.arange(10, dtype=np.float64), "labels are a float64 array, expected integers"),
    (np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 2**64 - 1], dtype=np.uint64),
     f"label {2**64 - 1} at index 9 outside 0..9"),
    ("0123456789", "labels are a str, expected a list of integers"),
], ids=["10", "-1", "2**70", "2**64-1", "3.7", "3.0", "nan", "inf", "bool", "bytes", "float-array",
        "uint64-array", "str"])
def test_cifar_python_labels_must_be_integer_class_ids(tmp_path, labels, message):
    tarball = tmp_path / "cifar-10-python.tar.gz"
    write_cifar_python(tarball, test_labels=labels)
    with pytest.raises(DataValidationError) as err:
        image_data.prepare("cifar10", tarball, tmp_path / "snaps")
    assert message in str(err.value)
    assert err.value.path == f"{tarball}!cifar-10-batches-py/test_batch" and err.value.field == "labels"
    assert not (tmp_path / "snaps").exists(), "nothing is written for invalid data"


def test_validate_refuses_labels_that_are_not_integers(mnist_dir):
    """Whatever the reader: a float label array (a NaN compares false to both bounds) is refused."""
    directory, _ = mnist_dir
    arrays, _ = idx.read_mnist(directory)
    broken = ImageArrays(arrays.x_train, arrays.y_train.astype(np.float64), arrays.x_test,
                         arrays.y_test, classes=arrays.classes)
    broken.y_train[0] = np.nan
    with pytest.raises(DataValidationError, match="train labels are float64, expected integers") as err:
        image_data.validate(broken, "mnist", "somewhere")
    assert err.value.field == "y_train"


def test_cifar_python_batch_missing_or_hostile(tmp_path):
    tarball = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        add_member(tar, "cifar-10-batches-py/batches.meta",
                   pickle.dumps({b"label_names": [c.encode() for c in CIFAR_CLASSES]}))
        add_member(tar, "cifar-10-batches-py/data_batch_1", pickle.dumps({b"data": Path("/etc")}))
    with pytest.raises(DataValidationError, match="lacks data_batch_2"):
        cifar.read_cifar(tarball)
    with tarfile.open(tarball, "w:gz") as tar:
        for name in cifar.CIFAR_MEMBERS:
            add_member(tar, f"cifar-10-batches-py/{name}", pickle.dumps({b"data": Path("/etc")}))
    # A pickle naming anything but numpy's array rebuilders is refused, not executed.
    with pytest.raises(DataValidationError, match="refusing to load pathlib") as err:
        cifar.read_cifar(tarball)
    assert err.value.path.startswith(f"{tarball}!cifar-10-batches-py/")


def test_imagefolder_tree_png_round_trips_and_sorts_classes(tmp_path):
    images = folder_images()
    root = write_folder(tmp_path / "tree", images)
    arrays, fmt = cifar.read_cifar(root)
    assert fmt == "imagefolder" and arrays.classes == CIFAR_CLASSES
    for split, x, y in (("train", arrays.x_train, arrays.y_train), ("test", arrays.x_test, arrays.y_test)):
        want_x, want_y = expected_folder_arrays(images, split)
        np.testing.assert_array_equal(x, want_x)
        np.testing.assert_array_equal(y, want_y)
    assert arrays.x_train.shape == (30, 32, 32, 3) and arrays.y_train.dtype == np.int64


def test_imagefolder_tarball_equals_tree_and_ignores_non_images(tmp_path):
    images = folder_images(seed=1)
    tree = write_folder(tmp_path / "tree" / "cifar10-jpeg", images)
    tarball = write_folder_tarball(tmp_path / "cifar10-jpeg.tar.gz", dict(reversed(images.items())),
                                   extra={"cifar10-jpeg/README.txt": b"hello",
                                          "cifar10-jpeg/train/cat/._0000.png": b"\0\5\x16\7"})
    from_tar = image_data.prepare("cifar10", tarball, tmp_path / "snaps")
    from_tree = image_data.prepare("cifar10", tree.parent, tmp_path / "snaps")
    # The same images give the same version, whatever the container and member order.
    assert from_tar.data_version == from_tree.data_version
    assert (from_tar.n_train, from_tar.n_test) == (30, 10)


def test_imagefolder_jpeg_is_decoded(tmp_path):
    images = folder_images(seed=2)
    smooth = {k: np.full((32, 32, 3), (i * 7) % 256, np.uint8) for i, k in enumerate(images)}
    tarball = write_folder_tarball(tmp_path / "jpeg.tar.gz", smooth, fmt="JPEG")
    arrays, _ = cifar.read_cifar(tarball)
    want, _ = expected_folder_arrays(smooth, "train")
    assert arrays.x_train.shape == want.shape
    assert np.abs(arrays.x_train.astype(int) - want).max() <= 2  # lossy, but flat images survive


def test_corrupt_image_in_folder_names_the_file(tmp_path):
    images = folder_images()
    root = write_folder(tmp_path / "tree", images)
    bad = root / "train" / "dog" / "0001.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated PNG
    with pytest.raises(DataValidationError, match="not a readable JPEG/PNG") as err:
        cifar.read_cifar(root)
    assert err.value.path == str(bad)


def test_corrupt_and_truncated_images_in_tarball_name_the_member(tmp_path):
    images = folder_images()
    jpeg = encode(images["train/cat/0000.png"], "JPEG")
    for member, data in [("root/test/cat/9999.png", b"garbage, not a png"),
                         ("root/train/cat/9999.jpg", jpeg[: len(jpeg) // 2])]:
        tarball = write_folder_tarball(tmp_path / "bad.tar.gz", images, root="root", extra={member: data})
        with pytest.raises(DataValidationError, match="not a readable JPEG/PNG") as err:
            cifar.read_cifar(tarball)
        assert err.value.path == f"{tarball}!{member}"


def test_sixteen_bit_image_is_refused_not_clipped(tmp_path):
    """A 16-bit grayscale PNG decodes (mode I;16); converting it would clip every value above 255
    to 255. Refused, naming the member."""
    images = folder_images()
    wide = (np.arange(32 * 32).reshape(32, 32) * 60).astype(np.uint16)  # up to 61,380
    member = "r/train/frog/9999.png"
    tarball = write_folder_tarball(tmp_path / "t.tar.gz", images, root="r",
                                   extra={member: encode(wide, "PNG")})
    with pytest.raises(DataValidationError, match=r"pixels are not 8-bit \(PIL mode 'I;16'\)") as err:
        cifar.read_cifar(tarball)
    assert (err.value.path, err.value.field) == (f"{tarball}!{member}", "mode")


def test_wrong_image_size_in_tarball(tmp_path):
    images = folder_images()
    images["train/frog/0000.png"] = np.zeros((28, 28, 3), np.uint8)
    tarball = write_folder_tarball(tmp_path / "t.tar.gz", images, root="r")
    with pytest.raises(DataValidationError, match="28x28, expected 32x32") as err:
        cifar.read_cifar(tarball)
    assert err.value.path == f"{tarball}!r/train/frog/0000.png"


def test_truncated_tarball_names_the_file(tmp_path):
    tarball = write_folder_tarball(tmp_path / "cifar.tar.gz", folder_images())
    data = tarball.read_bytes()
    tarball.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataValidationError, match="not a readable tarball") as err:
        cifar.read_cifar(tarball)
    assert err.value.path == str(tarball)
    tarball.write_bytes(b"\x1f\x8b" + b"\0" * 100)  # a gzip header and nothing sensible after
    with pytest.raises(DataValidationError, match="not a readable tarball"):
        cifar.read_cifar(tarball)


def test_missing_class_and_class_count(tmp_path):
    images = {k: v for k, v in folder_images().items() if k != "test/horse/0000.png"}
    tarball = write_folder_tarball(tmp_path / "t.tar.gz", images)
    with pytest.raises(DataValidationError, match="horse have no test images") as err:
        cifar.read_cifar(tarball)
    assert err.value.path == str(tarball)
    root = write_folder(tmp_path / "nine", folder_images(classes=CIFAR_CLASSES[:9]))
    with pytest.raises(DataValidationError, match="9 distinct classes") as err:
        image_data.prepare("cifar10", root, tmp_path / "snaps")
    assert err.value.field == "classes"


def test_image_outside_the_layout_and_empty_tarball(tmp_path):
    tarball = write_folder_tarball(tmp_path / "t.tar.gz", folder_images(),
                                   extra={"cifar10-jpeg/stray.png": encode(np.zeros((32, 32, 3), np.uint8),
                                                                           "PNG")})
    with pytest.raises(DataValidationError, match="outside the ImageFolder layout") as err:
        cifar.read_cifar(tarball)
    assert err.value.path.endswith("!cifar10-jpeg/stray.png")
    empty = write_folder_tarball(tmp_path / "e.tar.gz", {}, extra={"docs/readme.txt": b"x"})
    with pytest.raises(DataValidationError, match="neither CIFAR python batches"):
        cifar.read_cifar(empty)


# ---------------------------------------------------------------------------------------------
# Snapshot, mirror, download, CLI
# ---------------------------------------------------------------------------------------------


def test_snapshot_is_content_addressed_and_written_once(tmp_path, mnist_dir):
    directory, _ = mnist_dir
    first = image_data.prepare("mnist", directory, tmp_path / "snaps")
    manifest = Path(first.uri) / image_data.MANIFEST_FILE
    npz = Path(first.uri) / image_data.SNAPSHOT_FILE
    stamps = manifest.stat().st_mtime_ns, npz.stat().st_mtime_ns
    again = image_data.prepare("mnist", directory, tmp_path / "snaps")
    assert again == first
    assert (manifest.stat().st_mtime_ns, npz.stat().st_mtime_ns) == stamps, "never rewritten"
    assert not list((tmp_path / "snaps").glob(".staging-*")), "no staging dir left behind"

    other = tmp_path / "other"
    write_mnist(other, seed=1)
    assert image_data.prepare("mnist", other, tmp_path / "snaps").data_version != first.data_version
    # Moving one image from test to train changes the version even though the bytes concatenate alike.
    moved = ImageArrays(*(np.asarray(a) for a in (
        np.zeros((2, 28, 28, 1), np.uint8), np.zeros(2, np.int64),
        np.zeros((1, 28, 28, 1), np.uint8), np.zeros(1, np.int64))), classes=idx.MNIST_CLASSES)
    shifted = ImageArrays(moved.x_train[:1], moved.y_train[:1], moved.x_train, moved.y_train, moved.classes)
    assert image_data.content_version("mnist", moved) != image_data.content_version("mnist", shifted)


def test_mirror_layout_is_read(tmp_path, monkeypatch, mnist_dir):
    mirror = tmp_path / "mirror"
    shutil.copytree(mnist_dir[0], mirror / "mnist")
    (mirror / "cifar10").mkdir()
    write_folder_tarball(mirror / "cifar10" / "cifar10-jpeg.tar.gz", folder_images())
    monkeypatch.setenv("DATA_MIRROR", str(mirror))
    snap = image_data.prepare("mnist", None, tmp_path / "snaps")
    assert snap.source == str(mirror / "mnist") and snap.n_train == 50
    snap = image_data.prepare("cifar10", None, tmp_path / "snaps")
    assert snap.source == str(mirror / "cifar10" / "cifar10-jpeg.tar.gz") and snap.n_test == 10
    # The official python tarball, when the mirror has it, is preferred.
    write_cifar_python(mirror / "cifar10" / "cifar-10-python.tar.gz")
    snap = image_data.prepare("cifar10", None, tmp_path / "snaps")
    assert snap.source == str(mirror / "cifar10" / "cifar-10-python.tar.gz") and snap.n_train == 50


def test_mirror_without_the_files_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("DATA_MIRROR", str(tmp_path / "empty-mirror"))
    with pytest.raises(DataSourceError, match="mnist/train-images-idx3-ubyte.gz"):
        image_data.prepare("mnist", None, tmp_path / "snaps")
    with pytest.raises(DataSourceError, match="cifar10/cifar-10-python.tar.gz"):
        image_data.prepare("cifar10", None, tmp_path / "snaps")
    with pytest.raises(DataSourceError, match="t10k-labels-idx1-ubyte.gz"):
        write_mnist(tmp_path / "three")
        (tmp_path / "three" / "t10k-labels-idx1-ubyte.gz").unlink()
        image_data.prepare("mnist", tmp_path / "three", tmp_path / "snaps")


def test_download_when_no_mirror(tmp_path, monkeypatch, mnist_dir):
    """With no mirror the four files are fetched (here from a local HTTP server) and cached."""
    with serve_directory(mnist_dir[0]) as url:
        monkeypatch.setattr(idx, "MNIST_URL_BASES", [
            "http://127.0.0.1:9/mnist/",  # first mirror down: the next one is tried
            f"{url}/"])
        monkeypatch.setenv("VTM_DATA_DIR", str(tmp_path / "data"))
        snap = image_data.prepare("mnist", None, tmp_path / "snaps")
    cached = tmp_path / "data" / "raw" / "mnist"
    assert snap.source == str(cached) and snap.n_test == 20
    for filename in idx.MNIST_FILES.values():
        assert (cached / filename).read_bytes() == (mnist_dir[0] / filename).read_bytes()


def test_cli_prints_the_snapshot(tmp_path, capsys, mnist_dir):
    assert cli.main(["--dataset", "mnist", "--steps", "prepare", "--source", str(mnist_dir[0]),
                     "--out", str(tmp_path / "o")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["dataset"] == "mnist" and printed["uri"].startswith(str(tmp_path / "o"))
    assert image_data.load_snapshot(printed["uri"]).x_test.shape == (20, 28, 28, 1)


def test_unknown_dataset_is_refused():
    with pytest.raises(ValueError, match="dataset must be one of"):
        image_data.prepare("imagenet")


def test_real_mnist_from_the_shared_mirror(tmp_path, monkeypatch):
    if not all((SHARED_DATA / "mnist" / f).is_file() for f in idx.MNIST_FILES.values()):
        pytest.skip(f"real MNIST not present at {SHARED_DATA / 'mnist'} (see ../shared/data/README.md)")
    monkeypatch.setenv("DATA_MIRROR", str(SHARED_DATA))
    snap = image_data.prepare("mnist", None, tmp_path / "snaps")
    assert (snap.n_train, snap.n_test) == (60000, 10000)
    manifest = json.loads((Path(snap.uri) / image_data.MANIFEST_FILE).read_text())
    assert list(manifest["class_counts_train"].values()) == MNIST_COUNTS[0]
    assert list(manifest["class_counts_test"].values()) == MNIST_COUNTS[1]
