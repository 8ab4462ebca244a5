"""Image run parameters, the run's image subset and the PyTorch trainer on small learnable data
(no MLflow); the trainer core without Airflow and MLflow installed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from common import config
from scripts.core.errors import ParameterError
from scripts.image import pipeline as image_pipeline
from scripts.image.base import PROFILE_TABLE, ImageArrays, Subset, TrainConfig, draw_subset
from tests.image_synth import learnable

ROOT = Path(__file__).resolve().parents[1]
MNIST = config.get("mnist_cnn_training")


def test_the_profile_follows_the_device_and_the_run_overrides_both():
    fast = PROFILE_TABLE["mnist"]["fast"]
    assert fast.gpu is not None and (fast.gpu.epochs, fast.gpu.batch_size) != (fast.epochs, fast.batch_size)
    cfg = TrainConfig("mnist", "fast")
    assert cfg.recipe_on("cpu").batch_size == fast.batch_size and cfg.recipe == cfg.recipe_on("cpu")
    assert (cfg.recipe_on("cuda").epochs, cfg.recipe_on("cuda").batch_size) == (fast.gpu.epochs, fast.gpu.batch_size)
    assert TrainConfig("mnist", "fast", device="cuda").recipe.batch_size == fast.gpu.batch_size
    # What the run logs is the profile it ran: the GPU's figures on a GPU, no nested profile.
    assert TrainConfig("mnist", "fast").to_params("cuda")["recipe_batch_size"] == fast.gpu.batch_size
    assert "recipe_gpu" not in TrainConfig("mnist", "fast").to_params("cuda")
    # A run's own epochs and batch size hold on either device.
    mine = TrainConfig("mnist", "fast", epochs=5, batch_size=64)
    assert {(mine.recipe_on(d).epochs, mine.recipe_on(d).batch_size) for d in ("cpu", "cuda")} == {(5, 64)}
    # Profiles without a GPU variant run the same everywhere.
    assert TrainConfig("cifar10", "fast").recipe_on("cuda") == TrainConfig("cifar10", "fast").recipe_on("cpu")
    assert image_pipeline.run_device(TrainConfig("mnist", "fast", device="cpu")) == "cpu"
    assert image_pipeline.run_device(TrainConfig("mnist", "fast", framework="tensorflow")) == "cpu"


def test_params_are_validated_and_typed():
    cfg = image_pipeline.train_config(MNIST, "mnist", {"profile": "fast", "epochs": "3", "learning_rate": "0.05",
                                                       "batch_size": None})
    assert (cfg.profile, cfg.epochs, cfg.learning_rate, cfg.recipe.epochs) == ("fast", 3, 0.05, 3)
    assert cfg.recipe.batch_size == PROFILE_TABLE["mnist"]["fast"].batch_size  # None means: the profile's
    with pytest.raises(ParameterError, match="epoch"):
        image_pipeline.train_config(MNIST, "mnist", {"epoch": 3})
    with pytest.raises(ParameterError, match="profile"):
        image_pipeline.train_config(MNIST, "mnist", {"profile": "turbo"})
    with pytest.raises(ParameterError, match="framework") as err:
        image_pipeline.train_config(config.get("cifar10_cnn_training"), "cifar10", {"framework": "jax"})
    assert "cifar10_cnn_training" in str(err.value)


def test_prepare_checks_the_params_before_any_work(monkeypatch):
    """An unknown key fails the first step before it looks for data."""
    monkeypatch.setattr(image_pipeline.image_data, "prepare", lambda *a, **k: pytest.fail("data touched"))
    with pytest.raises(ParameterError, match="epochz"):
        image_pipeline.prepare(MNIST, "mnist", {"epochz": 3})


def test_the_subset_is_drawn_once_and_travels_as_json():
    """train draws the smoke subset; evaluate applies the indices it recorded (Trained XCom)."""
    x_train, y_train = learnable(3000, (28, 28, 1), 1)
    x_test, y_test = learnable(800, (28, 28, 1), 2)
    arrays = ImageArrays(x_train, y_train.astype(np.int64), x_test, y_test.astype(np.int64),
                         tuple(str(i) for i in range(10)))
    recipe = TrainConfig("mnist", "smoke").recipe
    drawn = draw_subset(arrays, recipe, seed=0)
    assert len(drawn.train) == 2000 and len(drawn.test) == 500
    assert list(drawn.test) == sorted(set(drawn.test))
    travelled = Subset.from_dict(json.loads(json.dumps(drawn.to_dict())))  # what XCom does to it
    assert travelled == drawn
    data = travelled.apply(arrays)
    np.testing.assert_array_equal(data.x_test, arrays.x_test[list(drawn.test)])
    np.testing.assert_array_equal(data.y_train, arrays.y_train[list(drawn.train)])
    # The whole split (fast profile, or a split no larger than the subset): no indices at all.
    whole = draw_subset(arrays, TrainConfig("mnist", "fast").recipe, seed=0)
    assert whole.to_dict() == {"train": None, "test": None} and whole.apply(arrays).x_test is arrays.x_test


def test_trainer_core_runs_without_airflow_or_mlflow():
    """A GPU box has torch, numpy and Pillow only: the trainer core and the benchmark import
    neither MLflow nor Airflow nor common (blocked here as if not installed)."""
    script = """
import importlib.abc, runpy, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("mlflow", "airflow", "common"):
            raise ImportError(f"{name} is not installed here")
sys.meta_path.insert(0, Block())
sys.path.insert(0, "dags")
for module in ("base", "idx", "cifar", "folder", "data", "torch_trainer", "plots"):
    __import__(f"scripts.image.{module}")
sys.argv = ["image_bench.py", "--help"]
try:
    runpy.run_path("bench/image_bench.py", run_name="__main__")
except SystemExit as stop:
    assert stop.code == 0, stop.code
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "image_bench" in done.stdout or "usage" in done.stdout


def test_checkpoints_are_per_airflow_run_not_per_try(monkeypatch, tmp_path):
    monkeypatch.setenv("VTM_DATA_DIR", str(tmp_path))
    path = image_pipeline.checkpoint_dir("mnist_cnn_training", "manual__2026-11-22T10:00:00+00:00", "pytorch")
    assert path == tmp_path / "checkpoints/mnist_cnn_training/manual__2026-11-22T10_00_00_00_00/pytorch"


@pytest.fixture(scope="module")
def digits() -> ImageArrays:
    x_train, y_train = learnable(1000, (28, 28, 1), 1)
    x_test, y_test = learnable(200, (28, 28, 1), 2)
    return ImageArrays(x_train, y_train.astype(np.int64), x_test, y_test.astype(np.int64),
                       tuple(str(i) for i in range(10)))


def test_torch_smoke_learns_and_reports(digits):
    from scripts.image.torch_trainer import train_torch

    seen = []
    result = train_torch(digits, TrainConfig("mnist", "smoke"), on_epoch=seen.append)
    assert [e.epoch for e in seen] == [1, 2] and result.history == seen
    assert result.test_accuracy > 0.5
    assert result.predictions.shape == (200,) and result.device == "cpu"
    # Whole batches of 32 only: 31 of them per epoch, the 8 images left over differ each epoch.
    assert result.images_per_second == pytest.approx(2 * 31 * 32 / result.train_seconds)
    logits = result.model(__import__("torch").from_numpy(digits.x_test[:3].astype("float32")))
    assert tuple(logits.shape) == (3, 10)


def test_torch_resume_continues_from_the_checkpoint(digits, tmp_path):
    from scripts.image.torch_trainer import train_torch

    cfg = TrainConfig("mnist", "smoke", epochs=3)

    def die_after_first(epoch):
        if epoch.epoch == 2:
            raise KeyboardInterrupt("worker killed")

    with pytest.raises(KeyboardInterrupt):
        train_torch(digits, cfg, on_epoch=die_after_first, checkpoint_dir=tmp_path)
    resumed = train_torch(digits, cfg, checkpoint_dir=tmp_path)
    assert resumed.resumed_from_epoch == 2  # epoch 2 was saved before on_epoch raised
    assert [h.epoch for h in resumed.history] == [1, 2, 3]
    uninterrupted = train_torch(digits, cfg)
    assert resumed.train_seconds > 0 and len(uninterrupted.history) == 3


def test_a_diverging_run_fails_for_good_before_its_checkpoint(digits, tmp_path, monkeypatch):
    """A non-finite loss (a run that diverged) is a TrainingError (never retried), raised before
    that epoch is checkpointed or reported. The divergence is forced: the loss is made NaN."""
    from scripts.core.errors import TrainingError
    from scripts.image import torch_trainer as image_torch

    cross_entropy = image_torch.F.cross_entropy
    monkeypatch.setattr(image_torch.F, "cross_entropy", lambda *a, **k: cross_entropy(*a, **k) * float("nan"))
    seen = []
    with pytest.raises(TrainingError, match="training diverged: train loss nan at epoch 1/2"):
        image_torch.train_torch(digits, TrainConfig("mnist", "smoke"), on_epoch=seen.append,
                                checkpoint_dir=tmp_path)
    assert seen == [] and not any(tmp_path.iterdir())


def test_cuda_without_a_gpu_fails_for_good():
    import torch

    from scripts.core.errors import TrainingError
    from scripts.image.torch_trainer import train_torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(TrainingError, match="no CUDA device"):
        train_torch(ImageArrays(*([np.zeros((1, 28, 28, 1), np.uint8), np.zeros(1, np.int64)] * 2),
                                tuple("0123456789")), TrainConfig("mnist", "smoke", device="cuda"))
