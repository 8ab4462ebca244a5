"""PyTorch trainer for the image workflows (MNIST, CIFAR-10): fast recipes, one code path for
CUDA and CPU, checkpoint every epoch, resume after a killed worker.

The whole data set is a tensor resident on the device (no DataLoader, no per-image Python);
each epoch's augmentation is a few whole-tensor operations on the device; on CUDA bf16 autocast,
channels-last memory and cuDNN's autotuner.

CIFAR-10 follows the published speed runs (airbench: Keller Jordan, "94% on CIFAR-10 in 3.29
Seconds on a Single GPU", 2024), in this project's own code (the components:
:mod:`scripts.image.speedrun`): a patch-whitening first layer whose bias trains for the first
three epochs, conv groups with batch norm of fixed scale and identity-initialised convs, batch
size 1024, Nesterov SGD with decoupled weight decay and a 64x step for batch-norm shifts, label
smoothing 0.2, lookahead (an EMA of the weights the fast weights are reset to), alternating
flips, 2-pixel translation (``quality``: a wider, deeper net, 4 pixels and cutout), test-time
augmentation with mirror and shifted views. MNIST keeps its compact net and recipe (tuned for
the 2-core CPU: docs/performance.md): no flips (digits are not mirror-symmetric).

No MLflow or Airflow here: the benchmark runs this module alone on a GPU box.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from scripts.core import threads
from scripts.core.errors import TrainingError
from scripts.image import speedrun
from scripts.image.base import (
    EpochCallback,
    EpochResult,
    ImageArrays,
    TrainConfig,
    TrainResult,
    ensure_converging,
)

CHECKPOINT = "checkpoint.pt"

# cuDNN's autotuner times the candidate kernels for each new shape once per process: it costs the
# first run (and a DAG task is always a first run) and pays on every later step. On by default;
# VTM_CUDNN_BENCHMARK=0 turns it off, so the GPU check can weigh the two for a task's wall time.
CUDNN_BENCHMARK = os.environ.get("VTM_CUDNN_BENCHMARK", "1") != "0"
EVAL_BATCH = 2000


class MnistNet(nn.Module):
    """~93 k parameters, ~2.1 M multiply-adds per digit: four conv - max-pool - BN - ReLU stages
    (16 channels at 28x28, 24 at 14x14, 64 at 7x7, then 128 at 3x3 without pooling), global max
    pooling, linear. Sized for the 2-core CPU, where a step costs its multiply-adds (about 55
    GFLOP/s): pooling before batch norm and ReLU makes those 4x cheaper, and the deepest conv
    runs at 3x3, where its width costs little (docs/performance.md)."""

    def __init__(self, classes: int = 10, widths: tuple[int, int, int, int] = (16, 24, 64, 128)) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
                                   for c_in, c_out in zip((1, *widths[:-1]), widths, strict=True))
        self.norms = nn.ModuleList(nn.BatchNorm2d(width) for width in widths)
        self.head = nn.Linear(widths[-1], classes)
        self.scale = 1 / 8  # max-pooled BN features are large: keep the first logits near zero

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.convs) - 1
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms, strict=True)):
            x = conv(x)
            x = F.relu(norm(x if i == last else F.max_pool2d(x, 2)))  # 28 -> 14 -> 7 -> 3, then 3
        return self.head(torch.amax(x, dim=(2, 3))) * self.scale


class ConvGroup(nn.Module):
    """conv - max-pool - BN - GELU - conv - BN - GELU. With ``depth`` 3 (the 96 %-class net) a
    residual block: conv - max-pool - BN - GELU, then conv - BN - GELU - conv - BN added to that
    and GELU after the sum. Convs start as identity maps, batch norms have a fixed scale."""

    def __init__(self, c_in: int, c_out: int, depth: int = 2, bn_momentum: float = 0.4) -> None:
        super().__init__()
        if depth not in (2, 3):
            raise ValueError(f"depth must be 2 or 3, not {depth}")
        self.convs = nn.ModuleList(speedrun.identity_init_(nn.Conv2d(c_in if i == 0 else c_out, c_out, 3,
                                                                     padding=1, bias=False))
                                   for i in range(depth))
        self.norms = nn.ModuleList(speedrun.frozen_scale_batchnorm(c_out, bn_momentum) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.norms[0](F.max_pool2d(self.convs[0](x), 2)))
        if len(self.convs) == 2:
            return F.gelu(self.norms[1](self.convs[1](x)))
        y = F.gelu(self.norms[1](self.convs[1](x)))
        return F.gelu(x + self.norms[2](self.convs[2](y)))


class SpeedNet(nn.Module):
    """airbench-shaped CIFAR-10 net: patch whitening (2x2, 24 channels) - GELU - three conv groups
    (each halves the resolution: 31 -> 15 -> 7 -> 3) - global max pool - linear, logits scaled
    by 1/9 (small logits keep the early high-learning-rate steps stable)."""

    def __init__(self, classes: int = 10, widths: tuple[int, int, int] = (64, 256, 256), depth: int = 2,
                 channels: int = 3, logit_scale: float = 1 / 9, bn_momentum: float = 0.4) -> None:
        super().__init__()
        self.whiten = speedrun.PatchWhitening(channels, 2)
        c_in, groups = self.whiten.out_channels, []
        for width in widths:
            groups.append(ConvGroup(c_in, width, depth, bn_momentum))
            c_in = width
        self.groups = nn.Sequential(*groups)
        self.head = nn.Linear(c_in, classes, bias=False)
        self.scale = logit_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.groups(F.gelu(self.whiten(x)))
        return self.head(torch.amax(x, dim=(2, 3))) * self.scale


# airbench expresses learning rate and weight decay per 1024 images, independent of the momentum:
# a Nesterov step is 1 + 1/(1 - momentum) times the gradient over time, so both are divided by
# that. Here they become the SGD rate for the mean batch loss, and the fraction of each weight
# decayed per step, at a batch of 1024 (both scale linearly with the batch: same per image).
def _per_1024(value: float, momentum: float) -> float:
    return value / (1 + 1 / (1 - momentum))


@dataclass(frozen=True)
class TorchRecipe:
    """How a data set trains (the profile says how long and in which batches)."""

    make_net: Callable[[int], nn.Module]  # classes -> net
    lr: float  # peak SGD learning rate for the mean batch loss (at reference_batch, if set)
    weight_decay: float  # fraction of each decayed weight removed per step at the schedule's peak
    momentum: float
    label_smoothing: float
    reference_batch: int | None = None  # lr and decay scale with batch / reference_batch; None: fixed
    norm_shift_lr_scale: float = 1.0  # batch-norm shifts step this much further (no more decay)
    decay_vectors: bool = False  # decay the 1-D parameters (norm shifts, biases) too
    warmup: float = 0.2  # triangular schedule: fraction of the steps to the peak,
    lr_start: float = 0.0  # and the factor at the start and at the end
    lr_end: float = 0.0
    translate: int = 0  # pixels, each axis
    cutout: int = 0  # square side, pixels
    flip: bool = False  # alternating left-right flips
    whiten_bias_epochs: int = 0  # with a PatchWhitening first layer: epochs its bias trains
    lookahead_every: int = 0  # steps between lookahead updates; 0: none
    lookahead_from_epoch: int = 0
    lookahead_epoch_end: bool = False  # the fast weights go back to the slow ones after every
    # epoch (else only after the last one)
    tta_level: int = 0  # speedrun.tta_views, when the profile asks for TTA

    def peak_lr(self, batch_size: int) -> float:
        return self.lr * batch_size / self.reference_batch if self.reference_batch else self.lr

    def decay(self, batch_size: int) -> float:
        return self.weight_decay * batch_size / self.reference_batch if self.reference_batch else self.weight_decay


# The MNIST recipe as tuned for the CPU: peak 0.4, weight decay 5e-4 of the rate (2e-4 per step).
MNIST = TorchRecipe(MnistNet, lr=0.4, weight_decay=0.4 * 5e-4, momentum=0.9, label_smoothing=0.1)
# airbench94's figures: lr 11.5 and decay 0.0153 per 1024 images, momentum 0.85, BN shifts 64x,
# schedule 0.2 -> 1 at 23 % -> 0.07, whitening bias 3 epochs, TTA 2; lookahead every 5 steps
# from the fourth epoch, the weights set back to the slow ones at the end of every epoch.
CIFAR_FAST = TorchRecipe(
    lambda classes: SpeedNet(classes), lr=_per_1024(11.5, 0.85), weight_decay=_per_1024(0.0153, 0.85),
    momentum=0.85, label_smoothing=speedrun.LABEL_SMOOTHING, reference_batch=1024, norm_shift_lr_scale=64.0,
    decay_vectors=True, warmup=0.23, lr_start=0.2, lr_end=0.07, translate=2, flip=True,
    whiten_bias_epochs=3, lookahead_every=5, lookahead_from_epoch=3, lookahead_epoch_end=True, tta_level=2)
# The 96 %-class net of the speed runs and their figures for it, as their airbench96 has them
# since its June 2024 revision (the reference issue 12 measured): widths 128-512-512, a residual
# block per group (GELU after the sum), lr 9.0 and decay 0.012 per 1024, 4-pixel translation,
# 12-pixel cutout, PyTorch's default batch-norm momentum (0.1), a shorter warm-up (10 % of the
# steps from 0.2) with the decay all the way to 0, lookahead from the first step, 31 epochs
# (base.PROFILE_TABLE).
CIFAR_QUALITY = TorchRecipe(
    lambda classes: SpeedNet(classes, widths=(128, 512, 512), depth=3, bn_momentum=0.1),
    lr=_per_1024(9.0, 0.85), weight_decay=_per_1024(0.012, 0.85), momentum=0.85,
    label_smoothing=speedrun.LABEL_SMOOTHING, reference_batch=1024, norm_shift_lr_scale=64.0,
    decay_vectors=True, warmup=0.1, lr_start=0.2, lr_end=0.0, translate=4, cutout=12, flip=True,
    whiten_bias_epochs=3, lookahead_every=5, lookahead_from_epoch=0, tta_level=2)


def recipe_for(dataset: str, profile: str) -> TorchRecipe:
    if dataset == "mnist":
        return MNIST
    return CIFAR_QUALITY if profile == "quality" else CIFAR_FAST


def pick_device(requested: str) -> torch.device:
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        # Permanent: a retry on the same worker has no GPU either.
        raise TrainingError("device='cuda' requested but no CUDA device is available on this worker")
    return torch.device("cuda")


def channel_stats(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (population) standard deviation of uint8 NHWC ``pixels`` in 0..1, as
    (1, C, 1, 1) float32, computed where the pixels are (one pass, float64 sums): numpy's
    two-pass std on the host costs a fresh CIFAR-10 task over a second."""
    dims = tuple(range(pixels.ndim - 1))
    n = pixels.numel() // pixels.shape[-1]
    values = pixels.float()
    mean = values.sum(dim=dims, dtype=torch.float64) / n
    variance = values.square().sum(dim=dims, dtype=torch.float64) / n - mean.square()
    return ((mean / 255).float().view(1, -1, 1, 1), (variance.clamp_min(0).sqrt() / 255).float().view(1, -1, 1, 1))


def to_tensor(pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> normalised float32 NCHW, on the device ``pixels`` are on."""
    t = pixels.permute(0, 3, 1, 2).float().div_(255)
    return ((t - mean) / std).contiguous()


def augment_epoch(padded: torch.Tensor, recipe: TorchRecipe, flips: speedrun.AlternatingFlip | None,
                  epoch: int, generator: torch.Generator) -> torch.Tensor:
    """This epoch's augmented copy of the whole training set, in a few whole-tensor ops:
    translated (crop of the reflect-padded images), mirrored (alternating), cut out."""
    x = speedrun.random_translate(padded, recipe.translate, generator)
    if flips is not None:
        x = speedrun.flip_where(x, flips.mask(epoch, x.device))
    return speedrun.cutout(x, recipe.cutout, generator)


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, tta_level: int, flip: bool, autocast) -> torch.Tensor:
    model.eval()
    outs = []
    for i in range(0, len(x), EVAL_BATCH):
        with autocast():
            outs.append(speedrun.tta_logits(model, x[i:i + EVAL_BATCH], tta_level, flip))
    return torch.cat(outs)


def make_optimizer(model: nn.Module, recipe: TorchRecipe, lr: float, decay: float) -> torch.optim.SGD:
    """Decoupled Nesterov SGD over every parameter (frozen ones included, for a stable layout
    across a resume: SGD skips those without a gradient), grouped by step size and decay."""
    norm_shifts = {id(m.bias) for m in model.modules() if isinstance(m, nn.BatchNorm2d) and m.bias is not None}
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for p in model.parameters():
        is_shift = id(p) in norm_shifts
        decays = recipe.decay_vectors or p.ndim > 1
        groups.setdefault((is_shift, decays), []).append(p)
    # Fused: one kernel per step for all parameters instead of a few per tensor (on CUDA the
    # launches are what a small net's step costs); same arithmetic as the per-tensor loop.
    return speedrun.decoupled_sgd(
        [(params, lr * (recipe.norm_shift_lr_scale if is_shift else 1.0), decay if decays else 0.0)
         for (is_shift, decays), params in sorted(groups.items())], recipe.momentum, fused=True)


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
    recipe = recipe_for(cfg.dataset, cfg.profile)
    device = pick_device(cfg.device)
    profile = cfg.recipe_on(device.type)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = CUDNN_BENCHMARK
    torch.manual_seed(cfg.seed)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    threads.apply()  # this task's share of the cores (intra- and inter-op pools), on CUDA too
    batch_size = profile.batch_size
    peak_lr = profile.learning_rate or recipe.peak_lr(batch_size)

    # uint8 crosses to the device (a quarter of the bytes of float32); the rest happens there.
    train_pixels = torch.from_numpy(arrays.x_train).to(device)
    mean, std = channel_stats(train_pixels)
    x_train = to_tensor(train_pixels, mean, std)
    del train_pixels
    y_train = torch.from_numpy(arrays.y_train).to(device)
    x_test = to_tensor(torch.from_numpy(arrays.x_test).to(device), mean, std).contiguous(
        memory_format=torch.channels_last)
    y_test = torch.from_numpy(arrays.y_test).to(device)

    model = recipe.make_net(len(arrays.classes)).to(device)
    whiten = getattr(model, "whiten", None)
    if isinstance(whiten, speedrun.PatchWhitening):
        # 5,000 images (4.8 M patches) pin the 12x12 patch covariance down; more cost time for nothing.
        whiten.fit(x_train[:5_000])
    # Channels-last pays on both: tensor cores on CUDA, oneDNN's blocked kernels on the CPU (1.4x).
    model = model.to(memory_format=torch.channels_last)
    pad = recipe.translate
    x_padded = F.pad(x_train, (pad,) * 4, mode="reflect") if pad else x_train
    if cuda:
        # bf16 halves the bytes of every epoch's augmentation and batch moves (the statistics and
        # the whitening fit above were taken in float32). The test set stays float32: autocast
        # casts each chunk, and it is read once per epoch.
        x_padded = x_padded.bfloat16()
    del x_train
    flips = speedrun.AlternatingFlip(len(y_train), cfg.seed) if recipe.flip else None

    optimizer = make_optimizer(model, recipe, peak_lr, recipe.decay(batch_size))
    # Whole batches only, as in the speed runs: the few images left over differ every epoch (a new
    # order each time), and one batch shape means one set of kernels for cuDNN to tune, not two.
    steps_per_epoch = max(1, len(y_train) // batch_size)
    total_steps = steps_per_epoch * profile.epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: speedrun.triangular_lr(
        s, total_steps, recipe.warmup, recipe.lr_start, recipe.lr_end))
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
        generator.set_state(state["generator"].cpu())  # a ByteTensor on the host, for either device
        start_epoch, train_seconds = state["epoch"], state["train_seconds"]
        history = [EpochResult(**h) for h in state["history"]]
    resumed_from = start_epoch
    lookahead = speedrun.Lookahead(model) if recipe.lookahead_every else None
    if lookahead is not None and start_epoch > recipe.lookahead_from_epoch:
        lookahead.load_state(state["lookahead"])
    tta_level = recipe.tta_level if profile.tta else 0
    final_logits = None

    for epoch in range(start_epoch, profile.epochs):
        model.train()
        if whiten is not None:
            whiten.set_bias_trainable(epoch < recipe.whiten_bias_epochs)
        averaging = lookahead is not None and epoch >= recipe.lookahead_from_epoch
        if averaging and epoch == recipe.lookahead_from_epoch:
            lookahead.reset(model)  # the averaging starts from the weights it finds
        last = epoch + 1 == profile.epochs
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        # One gather per epoch; the batches are then contiguous slices.
        order = torch.randperm(len(y_train), device=device, generator=generator)
        x_epoch = augment_epoch(x_padded, recipe, flips, epoch, generator)[order].contiguous(
            memory_format=torch.channels_last)
        y_epoch = y_train[order]
        loss_sum = torch.zeros((), device=device)
        for step in range(steps_per_epoch):
            rows = slice(step * batch_size, (step + 1) * batch_size)
            with autocast():
                loss = speedrun.smoothed_cross_entropy(model(x_epoch[rows]), y_epoch[rows], recipe.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            loss_sum += loss.detach()
            done = epoch * steps_per_epoch + step + 1
            if averaging and done % recipe.lookahead_every == 0:
                lookahead.update(model, speedrun.lookahead_decay(done, total_steps, recipe.lookahead_every))
        if averaging and (last or recipe.lookahead_epoch_end):
            lookahead.update(model, 1.0)  # back to the slow weights (the run ends on them)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        train_seconds += seconds
        # Each epoch's figure is the plain view; the last epoch's is the final (TTA) evaluation.
        logits = predict_logits(model, x_test, tta_level if last else 0, recipe.flip, autocast)
        if last:
            final_logits = logits
        accuracy = float((logits.argmax(1) == y_test).float().mean())
        result = EpochResult(epoch + 1, profile.epochs, float(loss_sum) / steps_per_epoch, accuracy,
                             seconds, device.type)
        ensure_converging(result)
        history.append(result)
        if ckpt:
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            _save_checkpoint(ckpt, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(), "generator": generator.get_state(),
                "epoch": epoch + 1, "train_seconds": train_seconds,
                "history": [h.__dict__ for h in history], "config": json.dumps(cfg.to_params(device.type)),
                "lookahead": lookahead.state() if lookahead is not None else None,
            })
        if on_epoch:
            on_epoch(result)

    if final_logits is None:  # resumed after the last epoch had been saved
        final_logits = predict_logits(model, x_test, tta_level, recipe.flip, autocast)
    predictions = final_logits.argmax(1).cpu().numpy().astype(np.int64)
    test_accuracy = float((predictions == arrays.y_test).mean())
    trained_images = steps_per_epoch * min(batch_size, len(y_train)) * profile.epochs
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
