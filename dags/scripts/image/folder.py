"""ImageFolder trees: ``<root>/{train,test}/<class>/*.jpg|*.png``, as a directory or (read by
``cifar``) a tarball's members. Class names sorted alphabetically are the label ids, which for
CIFAR-10 are the standard ids 0-9.

Every image is decoded now (a truncated one fails here, not in training) and must be 8-bit: a
16-bit or float image (a 16-bit grayscale PNG, which PIL would clip to 255 when converting) is
refused rather than converted. Errors name the file or ``archive!member``.
"""

from __future__ import annotations

import io
import os
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from scripts.core.errors import DataValidationError
from scripts.image.base import SPLITS, ImageArrays

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
IMAGE_FORMATS = ("JPEG", "PNG")  # PIL tries only these: faster, and nothing exotic slips through
# PIL modes whose channels are 8-bit (0..255). Others ("I;16", "I", "F": 16-bit PNGs) would be
# clipped, not scaled, by ``convert``: an image of saturated pixels that still parses.
EIGHT_BIT_MODES = frozenset({"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK",
                             "YCbCr"})


def image_key(relative: str) -> tuple[str, str, str] | None:
    """``(split, class, file)`` for ``.../{train,test}/<class>/<file>.jpg|png``; None: not an image.

    Hidden files (``.DS_Store``, macOS ``._x.jpg`` resource forks) are not images of the set.
    """
    parts = PurePosixPath(relative).parts
    if not parts or parts[-1].startswith(".") or not parts[-1].lower().endswith(IMAGE_SUFFIXES):
        return None
    if len(parts) < 3 or parts[-3] not in SPLITS:
        return ("", "", "")  # an image outside the layout: the collector rejects it
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


class FolderCollector:
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


def read_image_folder(root: Path, shape: tuple[int, int, int]) -> ImageArrays:
    """An ImageFolder directory (``root`` may be the tree itself or the folder above it)."""
    folder = FolderCollector(shape)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for filename in sorted(filenames):
            path = Path(dirpath) / filename
            key = image_key(path.relative_to(root).as_posix())
            if key is not None:
                folder.add(key, path.read_bytes(), str(path))
    if not len(folder):
        raise DataValidationError(root, "no images in an ImageFolder layout "
                                  "<root>/{train,test}/<class>/*.jpg|png")
    return folder.arrays(root)
