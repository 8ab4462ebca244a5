"""Keras 3 (TensorFlow backend) trainer for the image workflows (MNIST, CIFAR-10): the same
contract as ``torch_trainer.train_torch`` (``base``), so the pipeline does not care which
framework trained the model.

Recipe: the images given (the caller applies the profile's subset) are resident in memory as
uint8; a tf.data pipeline gathers shuffled index batches from them, augments batch-wise with
stateless random ops (random translate = crop of the reflect-padded image, horizontal flip;
CIFAR-10 only, digits are not mirror-symmetric) and casts on the device. A compact conv net with batch norm whose first layer
normalises per channel (mean/std of the training split), so the saved model takes raw 0..255
images NHWC and returns logits. SGD + Nesterov momentum with a one-cycle learning rate (linear
warm-up, linear decay to zero) over all steps, L2 weight decay on the kernels, label smoothing,
test-time augmentation (flip) for CIFAR-10. Mixed precision (float16) only on a GPU. Batch norm
runs TensorFlow's fused kernel (``FusedBatchNorm``): a saved model needs this module imported to
load. MNIST fast profile on the 2-core CPU: 99.45 % test accuracy in 2 epochs of about 41 s each
(docs/performance.md; TensorFlow's CPU kernels are slower here than PyTorch's).

Order per epoch: train -> evaluate -> checkpoint -> ``on_epoch``; so when ``on_epoch`` (or the
process) dies after epoch k, epoch k is already safe on disk and a rerun with the same
``checkpoint_dir`` resumes at epoch k + 1 (data order and augmentation depend only on seed and
epoch, the learning-rate schedule on the restored optimizer step).

No MLflow or Airflow here; TensorFlow is imported at module top, so import this module inside a
task, never in a DAG file.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from scripts.core import threads  # noqa: E402

threads.apply()  # TensorFlow reads its pool sizes (TF_NUM_*_THREADS) when its runtime starts

try:
    # TensorFlow and Triton (which torch loads on its first optimizer) each bring their own LLVM;
    # loading Triton after TensorFlow segfaults the process, loading it first is fine. A process
    # that scores a PyTorch champion beside a Keras challenger (evaluate, tests) needs both.
    import torch._dynamo  # noqa: F401
except ImportError:  # a TensorFlow-only image
    pass

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from keras import layers  # noqa: E402

from scripts.core.errors import TrainingError  # noqa: E402
from scripts.image.base import (  # noqa: E402
    EpochCallback,
    EpochResult,
    ImageArrays,
    TrainConfig,
    TrainResult,
    ensure_converging,
)

STATE = "state.json"  # the commit marker of a checkpoint: names the model file it belongs to
EVAL_BATCH = 1024


@dataclass(frozen=True)
class KerasRecipe:
    peak_lr: float
    label_smoothing: float
    weight_decay: float  # L2 on conv/dense kernels (coupled, as torch's SGD weight_decay)
    pad: int  # random translate by up to ``pad`` pixels (reflect padding); 0: none
    flip: bool  # random horizontal flip (and flip TTA where the profile asks for it)
    warmup: float = 0.2  # fraction of all steps spent warming up


RECIPES = {
    "mnist": KerasRecipe(peak_lr=0.4, label_smoothing=0.1, weight_decay=5e-4, pad=0, flip=False),
    "cifar10": KerasRecipe(peak_lr=0.2, label_smoothing=0.2, weight_decay=5e-4, pad=2, flip=True),
}


@keras.saving.register_keras_serializable(package="vtm_image")
class OneCycle(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from 0 to ``peak`` over ``warmup_steps``, then linear decay to 0 at ``total_steps``."""

    def __init__(self, peak: float, total_steps: int, warmup_steps: int) -> None:
        self.peak = float(peak)
        self.total_steps = int(total_steps)
        self.warmup_steps = max(1, int(warmup_steps))

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        up = self.peak * step / self.warmup_steps
        down = self.peak * (self.total_steps - step) / max(1, self.total_steps - self.warmup_steps)
        return keras.ops.maximum(keras.ops.where(step < self.warmup_steps, up, down), 0.0)

    def get_config(self) -> dict:
        return {"peak": self.peak, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps}


# ----------------------------------------------------------------------------------------- models

@keras.saving.register_keras_serializable(package="vtm_image")
class FusedBatchNorm(layers.BatchNormalization):
    """BatchNormalization computed by TensorFlow's fused kernel (NHWC, last axis): same weights,
    same config, about 1.5x faster training steps on the CPU than Keras 3's moments-based one.
    Loading a saved model needs this module imported (it registers the class)."""

    def call(self, inputs, training=None, mask=None):
        if mask is not None or self.renorm or len(inputs.shape) != 4 or self.axis not in (-1, 3):
            return super().call(inputs, training=training, mask=mask)
        gamma = tf.cast(self.gamma, tf.float32) if self.scale else tf.ones(inputs.shape[-1], tf.float32)
        beta = tf.cast(self.beta, tf.float32) if self.center else tf.zeros(inputs.shape[-1], tf.float32)
        if training and self.trainable:
            outputs, mean, variance = tf.compat.v1.nn.fused_batch_norm(
                inputs, gamma, beta, epsilon=self.epsilon, is_training=True)[:3]
            self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
            self.moving_variance.assign(
                self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
        else:
            outputs = tf.compat.v1.nn.fused_batch_norm(
                inputs, gamma, beta, mean=tf.cast(self.moving_mean, tf.float32),
                variance=tf.cast(self.moving_variance, tf.float32), epsilon=self.epsilon,
                is_training=False)[0]
        return tf.cast(outputs, self.compute_dtype)


def _conv_bn(x, filters: int, activation: str, pool: bool = False):
    """conv - [max-pool] - batch norm - activation; pooled before the norm: a quarter of its work."""
    x = layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
    if pool:
        x = layers.MaxPooling2D()(x)
    x = FusedBatchNorm(momentum=0.9, epsilon=1e-5)(x)
    return layers.Activation(activation)(x)


def mnist_net(shape: tuple[int, ...], classes: int, mean: np.ndarray, std: np.ndarray,
              widths: tuple[int, ...] = (16, 24, 64, 128)) -> keras.Model:
    """Compact digit net (~93 k parameters), the PyTorch trainer's (``torch_trainer.MnistNet``):
    four conv - max-pool - BN - ReLU stages (28 -> 14 -> 7 -> 3, the last without pooling),
    global max pool, dense. Sized for a 2-core CPU, where a step costs its multiply-adds."""
    inputs = keras.Input(shape, name="images")
    x = layers.Normalization(mean=mean, variance=np.square(std), name="normalise")(inputs)
    for i, width in enumerate(widths):
        x = _conv_bn(x, width, "relu", pool=i < len(widths) - 1)
    x = layers.GlobalMaxPooling2D()(x)
    outputs = layers.Dense(classes, dtype="float32", name="logits")(x)
    return keras.Model(inputs, outputs, name="mnist_net")


def cifar_net(shape: tuple[int, ...], classes: int, mean: np.ndarray, std: np.ndarray,
              widths: tuple[int, int, int] = (64, 256, 256)) -> keras.Model:
    """airbench-shaped: a stem, three conv-pool-conv blocks (64-256-256), max-pooled head."""
    inputs = keras.Input(shape, name="images")
    x = layers.Normalization(mean=mean, variance=np.square(std), name="normalise")(inputs)
    x = _conv_bn(x, 32, "gelu")
    for width in widths:
        x = _conv_bn(x, width, "gelu", pool=True)
        x = _conv_bn(x, width, "gelu")
    x = layers.GlobalMaxPooling2D()(x)
    x = layers.Dense(classes, use_bias=False, dtype="float32")(x)
    # airbench: a small logit scale stabilises the early high-LR steps
    outputs = layers.Rescaling(1 / 9, dtype="float32", name="logits")(x)
    return keras.Model(inputs, outputs, name="cifar_net")


NETS = {"mnist": mnist_net, "cifar10": cifar_net}


# ------------------------------------------------------------------------------------------- data

def _augment(x: tf.Tensor, seed: tf.Tensor, pad: int, flip: bool) -> tf.Tensor:
    """Batch-wise: random horizontal flip, random translate (crop of the reflect-padded batch)."""
    batch, height, width = tf.shape(x)[0], x.shape[1], x.shape[2]
    if flip:
        mirror = tf.random.stateless_uniform([batch], seed) < 0.5
        x = tf.where(mirror[:, None, None, None], tf.reverse(x, axis=[2]), x)
    if pad:
        padded = tf.pad(x, [[0, 0], [pad, pad], [pad, pad], [0, 0]], mode="REFLECT")
        offsets = tf.random.stateless_uniform([batch, 2], seed + tf.constant([0, 1], tf.int64),
                                              minval=0, maxval=2 * pad + 1, dtype=tf.int32)
        rows = offsets[:, :1] + tf.range(height)[None]
        cols = offsets[:, 1:] + tf.range(width)[None]
        x = tf.gather(tf.gather(padded, rows, axis=1, batch_dims=1), cols, axis=2, batch_dims=1)
    return x


def _steps_per_epoch(n: int, batch_size: int) -> tuple[int, int]:
    """(steps, batch): full batches only (a tiny last batch upsets batch norm)."""
    if n <= batch_size:
        return 1, n
    return n // batch_size, batch_size


def _train_dataset(x: tf.Tensor, y: tf.Tensor, batch_size: int, seed: int, epoch: int,
                   recipe: KerasRecipe) -> tf.data.Dataset:
    """This epoch's batches: order and augmentation depend on (seed, epoch) only."""
    n = int(y.shape[0])
    steps, batch = _steps_per_epoch(n, batch_size)
    order = np.random.default_rng([seed, epoch]).permutation(n)[:steps * batch].reshape(steps, batch)
    ds = tf.data.Dataset.from_tensor_slices(order).enumerate()

    def gather(step, idx):
        images = tf.gather(x, idx)
        if recipe.pad or recipe.flip:
            images = _augment(images, tf.stack([tf.constant(seed * 100_003 + epoch, tf.int64), step]),
                              recipe.pad, recipe.flip)
        return images, tf.gather(y, idx)

    options = tf.data.Options()
    options.threading.private_threadpool_size = threads.budget()  # AUTOTUNE within the task's share
    return ds.map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(
        tf.data.AUTOTUNE).with_options(options)


# --------------------------------------------------------------------------------- checkpointing

def _fingerprint(cfg: TrainConfig) -> dict:
    """What must match for a checkpoint to be resumed (the device may differ)."""
    params = cfg.to_params()
    params.pop("device", None)
    return params


def _save_checkpoint(directory: Path, model: keras.Model, state: dict) -> None:
    """Model file first (named by epoch), then the state JSON that points to it, each written to a
    temporary name and renamed: a kill at any moment leaves the previous checkpoint usable."""
    directory.mkdir(parents=True, exist_ok=True)
    name = f"model-epoch{state['epoch']:04d}.keras"
    tmp_model = directory / f"tmp-{name}"
    model.save(tmp_model)
    os.replace(tmp_model, directory / name)
    tmp_state = directory / f"{STATE}.tmp"
    tmp_state.write_text(json.dumps({**state, "model_file": name}, indent=1))
    os.replace(tmp_state, directory / STATE)
    for old in directory.glob("model-epoch*.keras"):
        if old.name != name:
            old.unlink(missing_ok=True)


def _load_checkpoint(directory: Path | None, cfg: TrainConfig) -> tuple[keras.Model, dict] | None:
    if directory is None or not (directory / STATE).is_file():
        return None
    state = json.loads((directory / STATE).read_text())
    if state.get("config") != _fingerprint(cfg):
        raise ValueError(f"{directory / STATE}: the checkpoint was written for other settings "
                         f"({state.get('config')}), not {_fingerprint(cfg)}; use a fresh checkpoint_dir")
    model = keras.models.load_model(directory / state["model_file"], compile=True)
    return model, state


# ------------------------------------------------------------------------------------------ train

def _pick_device(requested: str) -> str:
    gpus = tf.config.list_physical_devices("GPU")
    if requested == "cpu" or (requested == "auto" and not gpus):
        return "cpu"
    if not gpus:
        # Permanent: a retry on the same worker has no GPU either.
        raise TrainingError("device='cuda' requested but TensorFlow sees no GPU on this worker")
    return "cuda"


def _kernel_l2(model: keras.Model) -> list:
    return [v for v in model.trainable_variables if len(v.shape) > 1]


def train_keras(arrays: ImageArrays, cfg: TrainConfig, on_epoch: EpochCallback | None = None,
                checkpoint_dir: Path | None = None) -> TrainResult:
    """Train on ``arrays`` (the caller applies the profile's subset: ``base.draw_subset``),
    evaluate on its test split, return figures. Resumes from ``checkpoint_dir``.

    Order per epoch: train -> evaluate -> checkpoint -> ``on_epoch``.
    """
    threads.apply()  # tf.config.threading, where TensorFlow's runtime has not started yet
    device = _pick_device(cfg.device)
    previous_policy = keras.mixed_precision.global_policy()
    if device == "cuda":
        keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        with tf.device("/GPU:0" if device == "cuda" else "/CPU:0"):
            return _train(arrays, cfg, on_epoch, Path(checkpoint_dir) if checkpoint_dir else None, device)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)


def _train(arrays: ImageArrays, cfg: TrainConfig, on_epoch: EpochCallback | None,
           checkpoint_dir: Path | None, device: str) -> TrainResult:
    profile = cfg.recipe
    recipe = RECIPES[cfg.dataset]
    keras.utils.set_random_seed(cfg.seed)
    classes = len(arrays.classes)
    steps, batch = _steps_per_epoch(len(arrays.y_train), profile.batch_size)
    total_steps = steps * profile.epochs
    tta = profile.tta and recipe.flip

    with tf.device("/CPU:0"):  # the data set stays in host memory; batches go to the device
        x_train = tf.constant(arrays.x_train)
        y_train = tf.constant(arrays.y_train.astype(np.int32))
        test_ds = tf.data.Dataset.from_tensor_slices(arrays.x_test).batch(EVAL_BATCH).cache().prefetch(2)

    history: list[EpochResult] = []
    start_epoch, train_seconds, train_images = 0, 0.0, 0
    restored = _load_checkpoint(checkpoint_dir, cfg)
    if restored:
        model, state = restored
        start_epoch, train_seconds = int(state["epoch"]), float(state["train_seconds"])
        train_images = int(state["train_images"])
        history = [EpochResult(**h) for h in state["history"]]
        if int(model.optimizer.iterations.numpy()) != int(state["optimizer_step"]):
            model.optimizer.iterations.assign(int(state["optimizer_step"]))
    else:
        pixels = arrays.x_train.reshape(-1, arrays.x_train.shape[-1]).astype(np.float64)
        mean, std = pixels.mean(0), np.maximum(pixels.std(0), 1e-3)
        model = NETS[cfg.dataset](arrays.x_train.shape[1:], classes, mean, std)
        schedule = OneCycle(cfg.recipe.learning_rate or recipe.peak_lr, total_steps, round(recipe.warmup * total_steps))
        model.compile(optimizer=keras.optimizers.SGD(schedule, momentum=0.9, nesterov=True),
                      loss=keras.losses.CategoricalCrossentropy(from_logits=True,
                                                                label_smoothing=recipe.label_smoothing))
        model.optimizer.build(model.trainable_variables)  # compile wraps it for mixed precision

    optimizer = model.optimizer
    loss_scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    loss_fn = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=recipe.label_smoothing)
    kernels = _kernel_l2(model)
    loss_sum = tf.Variable(0.0, dtype=tf.float32, trainable=False)

    @tf.function
    def train_step(images, labels):
        images = tf.cast(images, tf.float32)
        targets = tf.one_hot(labels, classes)
        with tf.GradientTape() as tape:
            logits = model(images, training=True)
            loss = loss_fn(targets, logits)
            l2 = tf.add_n([tf.reduce_sum(tf.square(tf.cast(k, tf.float32))) for k in kernels])
            total = loss + 0.5 * recipe.weight_decay * l2
            scaled = optimizer.scale_loss(total) if loss_scaled else total
        grads = tape.gradient(scaled, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        loss_sum.assign_add(tf.cast(loss, tf.float32))

    @tf.function
    def predict_step(images):
        images = tf.cast(images, tf.float32)
        logits = tf.cast(model(images, training=False), tf.float32)
        if tta:
            logits += tf.cast(model(tf.reverse(images, axis=[2]), training=False), tf.float32)
        return tf.argmax(logits, axis=-1)

    def predict() -> np.ndarray:
        return np.concatenate([predict_step(b).numpy() for b in test_ds]).astype(np.int64)

    for epoch in range(start_epoch, profile.epochs):
        ds = _train_dataset(x_train, y_train, profile.batch_size, cfg.seed, epoch, recipe)
        loss_sum.assign(0.0)
        started = time.perf_counter()
        for images, labels in ds:
            train_step(images, labels)
        train_loss = float(loss_sum.numpy()) / steps  # waits for the last step
        seconds = time.perf_counter() - started
        train_seconds += seconds
        train_images += steps * batch
        accuracy = float((predict() == arrays.y_test).mean())
        result = EpochResult(epoch + 1, profile.epochs, train_loss, accuracy, seconds, device)
        ensure_converging(result)
        history.append(result)
        if checkpoint_dir is not None:
            _save_checkpoint(checkpoint_dir, model, {
                "epoch": epoch + 1, "total_epochs": profile.epochs, "train_seconds": train_seconds,
                "train_images": train_images, "optimizer_step": int(optimizer.iterations.numpy()),
                "history": [asdict(h) for h in history], "config": _fingerprint(cfg)})
        if on_epoch:
            on_epoch(result)

    predictions = predict()
    return TrainResult(
        test_accuracy=float((predictions == arrays.y_test).mean()), train_seconds=train_seconds,
        images_per_second=train_images / train_seconds if train_seconds else 0.0, device=device,
        predictions=predictions, history=history, resumed_from_epoch=start_epoch, model=model)
