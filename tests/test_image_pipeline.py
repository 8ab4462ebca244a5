"""Image run parameters and the PyTorch trainer on small learnable data (no MLflow)."""

from __future__ import annotations

import numpy as np
import pytest

from scripts.core.errors import ParameterError
from scripts.image import pipeline as image_pipeline
from scripts.image.base import ImageArrays, TrainConfig
from tests.image_synth import learnable


def test_params_are_validated_and_typed():
    cfg = image_pipeline.train_config("mnist", {"profile": "fast", "epochs": "3", "learning_rate": "0.05",
                                                "batch_size": None})
    assert (cfg.profile, cfg.epochs, cfg.learning_rate, cfg.recipe.epochs) == ("fast", 3, 0.05, 3)
    assert cfg.recipe.batch_size == 256  # None means: the profile's
    with pytest.raises(ParameterError, match="epoch"):
        image_pipeline.train_config("mnist", {"epoch": 3})
    with pytest.raises(ParameterError, match="profile"):
        image_pipeline.train_config("mnist", {"profile": "turbo"})
    with pytest.raises(ParameterError, match="framework"):
        image_pipeline.train_config("cifar10", {"framework": "jax"})


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
    assert result.images_per_second == pytest.approx(2 * 1000 / result.train_seconds)
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
