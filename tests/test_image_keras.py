"""The Keras 3 (TensorFlow) image trainer on small synthetic data sets, CPU only: learning,
per-epoch reporting, checkpoint/resume after an interruption."""

from __future__ import annotations

import json

import numpy as np
import pytest

from scripts.image.base import ImageArrays, TrainConfig

ik = pytest.importorskip("scripts.image.keras_trainer")
keras = pytest.importorskip("keras")


def synthetic(shape: tuple[int, int, int], n_train: int, n_test: int, seed: int = 0) -> ImageArrays:
    """10 learnable classes: a bright bar, horizontal (classes 0-4) or vertical (5-9), of length
    4, 8, .. 20 px, jittered around the centre, on noise. Symmetric under horizontal flips and
    small translations, so the CIFAR-10 augmentation keeps the labels right."""
    rng = np.random.default_rng(seed)
    h, w, c = shape

    def make(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 10, n)
        x = rng.normal(60, 25, (n, h, w, c))
        for i, k in enumerate(y):
            length, thick = 4 + 4 * (k % 5), 4
            bh, bw = (thick, length) if k < 5 else (length, thick)
            top = (h - bh) // 2 + rng.integers(-2, 3)
            left = (w - bw) // 2 + rng.integers(-2, 3)
            x[i, top:top + bh, left:left + bw, :] += 170
        return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int64)

    x_train, y_train = make(n_train)
    x_test, y_test = make(n_test)
    return ImageArrays(x_train, y_train, x_test, y_test, tuple(f"c{i}" for i in range(10)))


MNIST_LIKE = synthetic((28, 28, 1), 640, 200)
CIFAR_LIKE = synthetic((32, 32, 3), 384, 128, seed=1)


def smoke(dataset: str, profile: str = "smoke", **overrides) -> TrainConfig:
    """Tiny data, so small batches (more steps) and a gentler peak learning rate than the recipe's."""
    return TrainConfig(dataset=dataset, profile=profile, framework="tensorflow", device="cpu",
                       **{"batch_size": 32, "learning_rate": 0.05, **overrides})


def check_result(result, arrays: ImageArrays, epochs: int) -> None:
    labels = arrays.y_test  # the trainer tests on what it is given (the caller draws any subset)
    assert result.predictions.shape == labels.shape and result.predictions.dtype == np.int64
    assert result.test_accuracy == pytest.approx(float((result.predictions == labels).mean()))
    assert [h.epoch for h in result.history] == list(range(1, epochs + 1))
    assert all(h.total_epochs == epochs and h.device == "cpu" and h.seconds > 0 for h in result.history)
    assert result.train_seconds == pytest.approx(sum(h.seconds for h in result.history))
    assert result.train_seconds > 0 and result.images_per_second > 0
    assert result.device == "cpu" and isinstance(result.model, keras.Model)


def test_mnist_smoke_learns_and_reports_each_epoch():
    cfg = smoke("mnist", epochs=3)
    seen = []
    result = ik.train_keras(MNIST_LIKE, cfg, on_epoch=seen.append)
    check_result(result, MNIST_LIKE, 3)
    assert seen == result.history
    assert result.test_accuracy > 0.5, result.history
    assert result.history[-1].train_loss < result.history[0].train_loss
    # the model takes raw 0..255 images (normalisation inside) and returns logits
    logits = result.model.predict(MNIST_LIKE.x_test[:8].astype("float32"), verbose=0)
    assert logits.shape == (8, 10)
    assert keras.mixed_precision.global_policy().name == "float32"


def test_cifar_with_augmentation_and_tta():
    # the fast profile (whole splits, flip TTA) cut down to 4 epochs on the small synthetic set
    cfg = smoke("cifar10", profile="fast", epochs=4)
    assert cfg.recipe.tta
    seen = []
    result = ik.train_keras(CIFAR_LIKE, cfg, on_epoch=seen.append)
    check_result(result, CIFAR_LIKE, 4)
    assert len(seen) == 4 and len(result.predictions) == len(CIFAR_LIKE.y_test)
    assert result.test_accuracy > 0.5, result.history


def test_one_cycle_schedule():
    schedule = ik.OneCycle(0.2, total_steps=100, warmup_steps=20)
    lr = [float(schedule(s)) for s in (0, 10, 20, 60, 100, 120)]
    assert lr == pytest.approx([0.0, 0.1, 0.2, 0.1, 0.0, 0.0])
    assert ik.OneCycle.from_config(schedule.get_config()).get_config() == schedule.get_config()


def test_checkpoint_resume_after_interruption(tmp_path):
    # A finished run leaves one checkpoint; running it again trains nothing and reports the same.
    done = tmp_path / "done"
    cfg2 = smoke("mnist", epochs=2)
    first = ik.train_keras(MNIST_LIKE, cfg2, checkpoint_dir=done)
    state = json.loads((done / ik.STATE).read_text())
    assert state["epoch"] == 2 and sorted(p.name for p in done.iterdir()) == [
        "model-epoch0002.keras", ik.STATE]
    calls = []
    again = ik.train_keras(MNIST_LIKE, cfg2, on_epoch=calls.append, checkpoint_dir=done)
    assert calls == [] and again.resumed_from_epoch == 2 and again.history == first.history
    assert (again.predictions == first.predictions).all()

    # Order per epoch is train -> evaluate -> checkpoint -> on_epoch: a failure in on_epoch
    # after epoch 1 (as a killed worker) finds epoch 1 on disk.
    ckpt = tmp_path / "interrupted"
    cfg3 = smoke("mnist", epochs=3)

    def die_after_first(result):
        if result.epoch == 1:
            raise KeyboardInterrupt("worker killed")

    with pytest.raises(KeyboardInterrupt):
        ik.train_keras(MNIST_LIKE, cfg3, on_epoch=die_after_first, checkpoint_dir=ckpt)
    assert json.loads((ckpt / ik.STATE).read_text())["epoch"] == 1

    seen = []
    resumed = ik.train_keras(MNIST_LIKE, cfg3, on_epoch=seen.append, checkpoint_dir=ckpt)
    assert resumed.resumed_from_epoch == 1
    assert [r.epoch for r in seen] == [2, 3]
    check_result(resumed, MNIST_LIKE, 3)
    steps_per_epoch = len(MNIST_LIKE.y_train) // 32
    # optimizer state came back: the one-cycle schedule ran over all 3 epochs' steps, no more
    assert int(resumed.model.optimizer.iterations.numpy()) == 3 * steps_per_epoch
    assert resumed.images_per_second == pytest.approx(3 * steps_per_epoch * 32 / resumed.train_seconds)
    assert resumed.test_accuracy > 0.5
    # same data order, augmentation and schedule as an uninterrupted run (up to float noise)
    straight = ik.train_keras(MNIST_LIKE, cfg3)
    for a, b in zip(resumed.history, straight.history, strict=True):
        assert a.train_loss == pytest.approx(b.train_loss, rel=0.05)
    assert abs(resumed.test_accuracy - straight.test_accuracy) <= 0.05
    assert json.loads((ckpt / ik.STATE).read_text())["epoch"] == 3

    # a checkpoint is only resumed by the run it belongs to
    with pytest.raises(ValueError, match="other settings"):
        ik.train_keras(MNIST_LIKE, smoke("mnist", epochs=3, seed=1), checkpoint_dir=ckpt)


def test_cuda_without_gpu_is_an_error():
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        pytest.skip("a GPU is present")
    from scripts.core.errors import TrainingError

    with pytest.raises(TrainingError, match="no GPU"):  # permanent: never retried
        ik.train_keras(MNIST_LIKE, TrainConfig(dataset="mnist", framework="tensorflow", device="cuda"))
