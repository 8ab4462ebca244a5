"""What the image workflow's modules share: the data contract (shapes, ten classes, labels in
0..9, :class:`ImageArrays`), profiles, run settings, the run's image subset, per-epoch and final
results.

Pure standard library + numpy: the readers, both trainers and the pipeline speak these types, so
the pipeline (MLflow, registry) and the DAGs do not care which format the images came in or which
framework trained the model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from scripts.core.errors import DataValidationError, TrainingError

# The data contract every reader (idx, cifar, folder) produces and data.validate checks.
DATASETS = ("mnist", "cifar10")
SHAPES: dict[str, tuple[int, int, int]] = {"mnist": (28, 28, 1), "cifar10": (32, 32, 3)}
N_CLASSES = 10
SPLITS = ("train", "test")

FRAMEWORKS = ("pytorch", "tensorflow")
PROFILES = ("smoke", "fast", "quality")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class Profile:
    """How much work a run does. ``train_subset``/``test_subset`` of 0 mean the whole split."""

    epochs: int
    batch_size: int
    train_subset: int = 0
    test_subset: int = 0
    tta: bool = False  # test-time augmentation (horizontal flip), where it pays (CIFAR-10)
    # Peak learning rate, when not the trainer's recipe default: a few dozen smoke steps on a
    # small subset need a gentler peak than a full epoch of large batches.
    learning_rate: float | None = None
    # The profile on a CUDA device, where it differs: there a small net's step costs its kernel
    # launches, not its arithmetic, so fewer and larger batches; on the 2-core CPU the arithmetic
    # is the cost and smaller batches learn more per image. None: the same on both.
    gpu: Profile | None = None

    def on(self, device: str) -> Profile:
        """This profile as it runs on ``device`` ("cuda", else the CPU's)."""
        return self.gpu if device == "cuda" and self.gpu is not None else self


# Per data set: smoke trains on a small subset on the CPU in seconds (the test suite's profile);
# fast and quality are the real recipes (figures in docs/performance.md).
PROFILE_TABLE: dict[str, dict[str, Profile]] = {
    "mnist": {
        "smoke": Profile(epochs=2, batch_size=32, train_subset=2000, test_subset=500, learning_rate=0.1),
        # fast: >= 99.4 % in well under 45 s of training on the 2-core CPU (PyTorch); on a GPU
        # the earlier 3 epochs of 256 (docs/performance.md).
        "fast": Profile(epochs=2, batch_size=128, gpu=Profile(epochs=3, batch_size=256)),
        "quality": Profile(epochs=12, batch_size=256),
    },
    "cifar10": {
        "smoke": Profile(epochs=2, batch_size=32, train_subset=2000, test_subset=500, learning_rate=0.1),
        # The speed runs' batch (airbench: 1024) and epochs: airbench94's 9.9 rounded up (whole
        # epochs checkpoint cleanly), airbench96's 31 (torch_trainer.CIFAR_QUALITY).
        "fast": Profile(epochs=10, batch_size=1024, tta=True),
        "quality": Profile(epochs=31, batch_size=1024, tta=True),
    },
}


@dataclass(frozen=True)
class TrainConfig:
    """A run's settings. From run parameters, build it with ``scripts.image.pipeline.train_config``
    (``scripts.core.params.build``: typed, bounded, unknown keys rejected, each error naming the
    field); the defaults are the DAGs' (``common.config``; the integrity test checks they agree)."""

    dataset: str  # "mnist" | "cifar10"
    profile: str = "fast"
    framework: str = "pytorch"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    epochs: int | None = None  # override the profile's
    batch_size: int | None = None
    learning_rate: float | None = None  # peak of the one-cycle schedule (None: the recipe's)

    def __post_init__(self) -> None:
        if self.dataset not in PROFILE_TABLE:
            raise ValueError(f"dataset must be one of {sorted(PROFILE_TABLE)}, not {self.dataset!r}")
        if self.profile not in PROFILES:
            raise ValueError(f"profile must be one of {PROFILES}, not {self.profile!r}")
        if self.framework not in FRAMEWORKS:
            raise ValueError(f"framework must be one of {FRAMEWORKS}, not {self.framework!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, not {self.device!r}")
        # The same bounds as the run parameters' (common.config), for a TrainConfig built by hand:
        # 0 epochs must not mean "the profile's" (None does), and a step size must be positive.
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1 or None, not {value!r}")
        if self.learning_rate is not None and not self.learning_rate > 0:  # also catches NaN
            raise ValueError(f"learning_rate must be > 0 or None, not {self.learning_rate!r}")

    @property
    def recipe(self) -> Profile:
        """The profile with this run's overrides, on the device it names ("auto": the CPU's;
        a trainer that resolved "auto" asks :meth:`recipe_on` its device)."""
        return self.recipe_on(self.device)

    def recipe_on(self, device: str) -> Profile:
        base = PROFILE_TABLE[self.dataset][self.profile].on(device)

        def given(value, default):  # None: not set; never a falsy value standing for "default"
            return default if value is None else value

        return Profile(epochs=given(self.epochs, base.epochs), batch_size=given(self.batch_size, base.batch_size),
                       train_subset=base.train_subset, test_subset=base.test_subset, tta=base.tta,
                       learning_rate=given(self.learning_rate, base.learning_rate))

    def to_params(self, device: str | None = None) -> dict[str, object]:
        """The settings and the profile as run on ``device`` (default: the one it names)."""
        recipe = self.recipe_on(device or self.device)
        return {**asdict(self), **{f"recipe_{k}": v for k, v in asdict(recipe).items() if k != "gpu"}}


@dataclass(frozen=True)
class ImageArrays:
    """A data set in memory: images uint8 (N, H, W, C), labels int64 (N,), class names."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: tuple[str, ...]


def check_labels(labels: np.ndarray, name: str | Path, field: str) -> None:
    """Every label in 0..9, checked where it was read so the error names that file or member."""
    bad = np.flatnonzero((labels < 0) | (labels >= N_CLASSES))
    if len(bad):
        raise DataValidationError(name, f"label {int(labels[bad[0]])} at index {int(bad[0])} outside "
                                  f"0..{N_CLASSES - 1} ({len(bad)} such)", field=field)


@dataclass(frozen=True)
class EpochResult:
    epoch: int  # 1-based
    total_epochs: int
    train_loss: float
    val_accuracy: float
    seconds: float  # this epoch's training loop
    device: str


def ensure_converging(result: EpochResult) -> None:
    """A non-finite training loss means the run diverged (a learning rate too high for the
    recipe): fail it now, for good, before it is checkpointed, logged or registered."""
    if not math.isfinite(result.train_loss):
        raise TrainingError(f"training diverged: train loss {result.train_loss} at epoch "
                            f"{result.epoch}/{result.total_epochs}; lower learning_rate or use the profile's")


@dataclass
class TrainResult:
    test_accuracy: float
    train_seconds: float  # training loop only (no data loading, no evaluation)
    images_per_second: float
    device: str
    predictions: np.ndarray  # predicted class per test image given to the trainer
    history: list[EpochResult] = field(default_factory=list)
    resumed_from_epoch: int = 0
    model: object = None  # the framework's model object, for logging


EpochCallback = Callable[[EpochResult], None]


@dataclass(frozen=True)
class Subset:
    """The images a run uses: sorted indices into each split, None for the whole split.

    Drawn once per run (:func:`draw_subset`, by the train step); the evaluate step applies the
    same indices (they travel in the train step's XCom), it never draws again.
    """

    train: tuple[int, ...] | None = None
    test: tuple[int, ...] | None = None

    def apply(self, arrays: ImageArrays) -> ImageArrays:
        def take(x: np.ndarray, y: np.ndarray, idx: tuple[int, ...] | None) -> tuple[np.ndarray, np.ndarray]:
            if idx is None:
                return x, y
            rows = np.asarray(idx, dtype=np.int64)
            return x[rows], y[rows]

        return ImageArrays(*take(arrays.x_train, arrays.y_train, self.train),
                           *take(arrays.x_test, arrays.y_test, self.test), arrays.classes)

    def to_dict(self) -> dict[str, list[int] | None]:
        """JSON-ready (XCom): lists of ints or None."""
        return {"train": None if self.train is None else list(self.train),
                "test": None if self.test is None else list(self.test)}

    @classmethod
    def from_dict(cls, value: Mapping[str, Sequence[int] | None]) -> Subset:
        def rows(idx: Sequence[int] | None) -> tuple[int, ...] | None:
            return None if idx is None else tuple(int(i) for i in idx)

        return cls(rows(value["train"]), rows(value["test"]))


def draw_subset(arrays: ImageArrays, recipe: Profile, seed: int) -> Subset:
    """The profile's class-balanced-in-expectation random subset (whole splits when 0)."""
    rng = np.random.default_rng(seed)

    def pick(n_rows: int, n: int) -> tuple[int, ...] | None:
        if not n or n >= n_rows:
            return None
        return tuple(int(i) for i in np.sort(rng.choice(n_rows, size=n, replace=False)))

    return Subset(pick(len(arrays.y_train), recipe.train_subset), pick(len(arrays.y_test), recipe.test_subset))
