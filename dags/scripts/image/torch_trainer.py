"""PyTorch trainer for the image workflows (MNIST, CIFAR-10): fast recipes, one code path for
CUDA and CPU, checkpoint every epoch, resume after a killed worker.

Recipe, in the spirit of the published speed runs (airbench for CIFAR-10), written for this
project: the whole data set is a tensor resident on the device (no DataLoader, no per-image
Python), augmentation is done batch-wise on the device (random crop after reflect padding =
translate, horizontal flip for CIFAR-10 only: digits are not mirror-symmetric), a compact net
with batch norm, SGD + Nesterov with a one-cycle (triangular) learning rate, label smoothing;
on CUDA bf16 autocast and channels-last memory; test-time augmentation (flip) for CIFAR-10.

No MLflow or Airflow here: the benchmark runs this module alone on a GPU box.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from scripts.core import threads
from scripts.core.errors import TrainingError
from scripts.image.base import (
    EpochCallback,
    EpochResult,
    ImageArrays,
    TrainConfig,
    TrainResult,
    ensure_converging,
)

CHECKPOINT = "checkpoint.pt"


def conv_bn(c_in: int, c_out: int, act: type[nn.Module] = nn.GELU) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                         act())


class MnistNet(nn.Module):
    """~60 k parameters, ~3 M multiply-adds per digit: conv16 - pool - conv32 - pool - conv64 x2,
    batch norm and ReLU, global max pooling. Small enough that an epoch of 60,000 digits takes
    about 10 s on a 2-core CPU; the wider tutorial-style nets cost 3-7x more for no accuracy."""

    def __init__(self, classes: int = 10, widths: tuple[int, int, int] = (16, 32, 64)) -> None:
        super().__init__()
        w1, w2, w3 = widths
        self.features = nn.Sequential(
            conv_bn(1, w1, nn.ReLU), nn.MaxPool2d(2),    # 14x14
            conv_bn(w1, w2, nn.ReLU), nn.MaxPool2d(2),   # 7x7
            conv_bn(w2, w3, nn.ReLU), conv_bn(w3, w3, nn.ReLU),
        )
        self.head = nn.Linear(w3, classes)
        self.scale = 1 / 8  # max-pooled BN features are large: keep the first logits near zero

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.amax(self.features(x), dim=(2, 3))) * self.scale


class CifarNet(nn.Module):
    """airbench-shaped: a stem, three conv-pool-conv blocks (64-256-256), max-pooled head."""

    def __init__(self, classes: int = 10, widths: tuple[int, int, int] = (64, 256, 256)) -> None:
        super().__init__()
        w1, w2, w3 = widths
        self.stem = conv_bn(3, 32)
        self.blocks = nn.Sequential(
            nn.Sequential(conv_bn(32, w1), nn.MaxPool2d(2), conv_bn(w1, w1)),   # 16x16
            nn.Sequential(conv_bn(w1, w2), nn.MaxPool2d(2), conv_bn(w2, w2)),   # 8x8
            nn.Sequential(conv_bn(w2, w3), nn.MaxPool2d(2), conv_bn(w3, w3)),   # 4x4
        )
        self.head = nn.Linear(w3, classes, bias=False)
        self.scale = 1 / 9  # airbench: a small logit scale stabilises the early high-LR steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.head(torch.amax(x, dim=(2, 3))) * self.scale


RECIPES = {
    # dataset: (net, peak lr, label smoothing, translate px, flip, weight decay)
    "mnist": (MnistNet, 0.4, 0.1, 0, False, 5e-4),
    "cifar10": (CifarNet, 0.2, 0.2, 2, True, 5e-4),
}


def pick_device(requested: str) -> torch.device:
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        # Permanent: a retry on the same worker has no GPU either.
        raise TrainingError("device='cuda' requested but no CUDA device is available on this worker")
    return torch.device("cuda")


def to_tensor(x: np.ndarray, device: torch.device, mean: torch.Tensor, std: torch.Tensor,
              channels_last: bool) -> torch.Tensor:
    t = torch.from_numpy(x).to(device).permute(0, 3, 1, 2).float().div_(255)
    t = (t - mean) / std
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t.contiguous()


def augment_epoch(padded: torch.Tensor, pad: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """This epoch's augmented copy of the whole training set, in a few large tensor ops: each
    image translated by a random offset (crop of the reflect-padded image, grouped by offset) and,
    for CIFAR-10, flipped horizontally with probability 1/2."""
    n, h, w = padded.shape[0], padded.shape[2] - 2 * pad, padded.shape[3] - 2 * pad
    if not pad:
        out = padded.clone()
    else:
        shifts = torch.randint(0, 2 * pad + 1, (n, 2), device=padded.device, generator=generator)
        out = torch.empty((n, padded.shape[1], h, w), dtype=padded.dtype, device=padded.device)
        for dy in range(2 * pad + 1):
            for dx in range(2 * pad + 1):
                mask = (shifts[:, 0] == dy) & (shifts[:, 1] == dx)
                out[mask] = padded[mask, :, dy:dy + h, dx:dx + w]
    if flip:
        mask = torch.rand(n, device=padded.device, generator=generator) < 0.5
        out = torch.where(mask[:, None, None, None], out.flip(3), out)
    return out


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch: int, tta: bool, autocast) -> torch.Tensor:
    model.eval()
    outs = []
    for i in range(0, len(x), batch):
        chunk = x[i:i + batch]
        with autocast():
            logits = model(chunk).float()
            if tta:
                logits = logits + model(chunk.flip(3)).float()
        outs.append(logits)
    return torch.cat(outs)


def _save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a kill mid-save leaves the previous checkpoint intact


def train_torch(arrays: ImageArrays, cfg: TrainConfig, on_epoch: EpochCallback | None = None,
                checkpoint_dir: Path | None = None) -> TrainResult:
    """Train on ``arrays`` (the caller applies the profile's subset: ``base.draw_subset``),
    evaluate on its test split, return figures. Resumes from ``checkpoint_dir``.

    Order per epoch: train -> evaluate -> checkpoint -> ``on_epoch``; so when ``on_epoch`` (or the
    process) dies, that epoch is already safe on disk.
    """
    recipe = cfg.recipe
    device = pick_device(cfg.device)
    cuda = device.type == "cuda"
    torch.manual_seed(cfg.seed)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    threads.apply()  # this task's share of the cores (intra- and inter-op pools), on CUDA too
    net_cls, peak_lr, smoothing, pad, flip, weight_decay = RECIPES[cfg.dataset]
    peak_lr = recipe.learning_rate or peak_lr

    channels = arrays.x_train.shape[-1]
    mean = torch.tensor(arrays.x_train.reshape(-1, channels).mean(0) / 255, device=device).view(1, -1, 1, 1).float()
    std = torch.tensor(arrays.x_train.reshape(-1, channels).std(0) / 255, device=device).view(1, -1, 1, 1).float()
    x_train = to_tensor(arrays.x_train, device, mean, std, False)
    x_padded = F.pad(x_train, (pad,) * 4, mode="reflect") if pad else x_train
    y_train = torch.from_numpy(arrays.y_train).to(device)
    x_test = to_tensor(arrays.x_test, device, mean, std, True)
    y_test = torch.from_numpy(arrays.y_test).to(device)

    # Channels-last pays on both: tensor cores on CUDA, oneDNN's blocked kernels on the CPU (1.4x).
    model = net_cls(len(arrays.classes)).to(device).to(memory_format=torch.channels_last)
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=peak_lr, momentum=0.9, nesterov=True)
    steps_per_epoch = (len(y_train) + recipe.batch_size - 1) // recipe.batch_size
    total_steps = steps_per_epoch * recipe.epochs
    warmup = max(1, int(0.2 * total_steps))
    # One cycle: linear warm-up to the peak, then linear decay to zero.
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: s / warmup if s < warmup else max(0.0, (total_steps - s) / (total_steps - warmup)))
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else (
        lambda: torch.autocast("cpu", enabled=False))

    history: list[EpochResult] = []
    start_epoch, train_seconds = 0, 0.0
    ckpt = checkpoint_dir / CHECKPOINT if checkpoint_dir else None
    if ckpt and ckpt.is_file():
        state = torch.load(ckpt, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        generator.set_state(state["generator"].to("cpu") if not cuda else state["generator"])
        start_epoch, train_seconds = state["epoch"], state["train_seconds"]
        history = [EpochResult(**h) for h in state["history"]]
    resumed_from = start_epoch

    for epoch in range(start_epoch, recipe.epochs):
        model.train()
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        order = torch.randperm(len(y_train), device=device, generator=generator)
        x_epoch = augment_epoch(x_padded, pad, flip, generator).contiguous(
            memory_format=torch.channels_last)
        loss_sum = torch.zeros((), device=device)
        for step in range(steps_per_epoch):
            idx = order[step * recipe.batch_size:(step + 1) * recipe.batch_size]
            batch = x_epoch[idx]
            with autocast():
                loss = F.cross_entropy(model(batch), y_train[idx], label_smoothing=smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            loss_sum += loss.detach()
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        train_seconds += seconds
        logits = predict_logits(model, x_test, 2048, recipe.tta and flip, autocast)
        accuracy = float((logits.argmax(1) == y_test).float().mean())
        result = EpochResult(epoch + 1, recipe.epochs, float(loss_sum) / steps_per_epoch, accuracy,
                             seconds, device.type)
        ensure_converging(result)
        history.append(result)
        if ckpt:
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            _save_checkpoint(ckpt, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(), "generator": generator.get_state(),
                "epoch": epoch + 1, "train_seconds": train_seconds,
                "history": [h.__dict__ for h in history], "config": json.dumps(cfg.to_params()),
            })
        if on_epoch:
            on_epoch(result)

    logits = predict_logits(model, x_test, 2048, recipe.tta and flip, autocast)
    predictions = logits.argmax(1).cpu().numpy().astype(np.int64)
    test_accuracy = float((predictions == arrays.y_test).mean())
    trained_images = len(y_train) * recipe.epochs
    model.eval()
    return TrainResult(test_accuracy=test_accuracy, train_seconds=train_seconds,
                       images_per_second=trained_images / train_seconds if train_seconds else 0.0,
                       device=device.type, predictions=predictions, history=history,
                       resumed_from_epoch=resumed_from, model=NormalizedModel(model, mean, std).cpu().eval())


class NormalizedModel(nn.Module):
    """What is logged: takes uint8-range float images NHWC (as the data set stores them) and
    returns logits, so serving needs no knowledge of the training normalisation."""

    def __init__(self, net: nn.Module, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", mean.detach().clone())
        self.register_buffer("std", std.detach().clone())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float() / 255
        return self.net((x - self.mean) / self.std).float()
