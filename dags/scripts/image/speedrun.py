"""The building blocks of the speed-run recipe for small images (CIFAR-10 first), each on its own
so it can be tested on the CPU and reused by :mod:`scripts.image.torch_trainer`.

The methods are those the published CIFAR-10 speed runs describe in the open (Keller Jordan,
"94% on CIFAR-10 in 3.29 Seconds on a Single GPU", 2024; the airbench repository's README); the
code is this project's own:

* :class:`PatchWhitening`: a first convolution whose filters whiten the training images' 2x2
  patches (eigen-decomposition of their covariance), frozen; only its bias trains, and only for
  the first epochs;
* :func:`frozen_scale_batchnorm`: batch norm whose scale is fixed at 1 (only the shift trains);
* :func:`identity_init_`: convolutions that start as identity maps of their inputs (an implicit
  residual);
* :func:`decoupled_sgd`: Nesterov SGD whose weight-decay step does not depend on the learning
  rate, with a larger step for batch-norm shifts;
* :func:`triangular_lr`: the warm-up-then-decay learning-rate factor;
* :func:`smoothed_cross_entropy`: cross-entropy with label smoothing (0.2 for CIFAR-10);
* :class:`Lookahead`: an exponential moving average of the weights that the fast weights are
  reset to every few steps, its decay rising over the run (:func:`lookahead_decay`);
* :class:`AlternatingFlip`: each image mirrored on every other epoch, exactly half of them in
  any epoch, instead of a fresh coin toss per epoch;
* :func:`random_translate` (pad-and-crop by up to ``pad`` pixels) and :func:`cutout`;
* :func:`tta_logits`: test-time augmentation averaging the mirrored and shifted views.

Torch only (no Airflow, no MLflow): the GPU box runs this alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.nn import functional as F

# airbench's figure for CIFAR-10: each target keeps 0.8 + 0.02 of its mass, each other class 0.02.
LABEL_SMOOTHING = 0.2


# ---------------------------------------------------------------------------------------------
# Patch whitening


def image_patches(images: torch.Tensor, size: int) -> torch.Tensor:
    """Every ``size`` x ``size`` patch of NCHW ``images`` (stride 1, no padding), one row each:
    (N * positions, C * size * size), in the channel-major order a conv weight flattens to."""
    c = images.shape[1]
    patches = images.unfold(2, size, 1).unfold(3, size, 1)  # N, C, H', W', size, size
    return patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * size * size)


def whitening_filters(images: torch.Tensor, size: int = 2, eps: float = 5e-4) -> torch.Tensor:
    """Conv filters (2 * C*size*size, C, size, size) that map each patch onto the eigenvectors of
    the patches' (uncentred) covariance, each divided by the square root of its eigenvalue: the
    responses are decorrelated with unit variance. ``eps`` keeps the near-null directions (noise)
    from being blown up. The second half is the first negated, so that the activation after this
    layer keeps both signs of every direction."""
    patches = image_patches(images.float(), size)
    covariance = (patches.T @ patches / len(patches)).cpu().double()
    # The 12x12 eigen-decomposition on the CPU, in float64: exact, and no GPU solver library to
    # load (that costs a fresh process about a second).
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    order = eigenvalues.argsort(descending=True)  # strongest direction first
    scaled = eigenvectors[:, order].T / torch.sqrt(eigenvalues[order].clamp_min(0) + eps)[:, None]
    filters = scaled.reshape(-1, images.shape[1], size, size).float().to(images.device)
    return torch.cat([filters, -filters])


class PatchWhitening(nn.Module):
    """First layer: a ``size`` x ``size`` convolution (no padding) with whitening filters fixed
    from the training images (:meth:`fit`) and a bias that trains while :attr:`bias_trainable`."""

    def __init__(self, channels: int = 3, size: int = 2) -> None:
        super().__init__()
        self.size = size
        self.out_channels = 2 * channels * size * size
        # A buffer, not a parameter: the filters never train (and take no weight decay).
        self.register_buffer("weight", torch.zeros(self.out_channels, channels, size, size))
        self.bias = nn.Parameter(torch.zeros(self.out_channels))

    @torch.no_grad()
    def fit(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        self.weight.copy_(whitening_filters(images.to(self.weight.device), self.size, eps))

    def set_bias_trainable(self, trainable: bool) -> None:
        # Frozen after the first epochs: by then it has found the data's offsets, and a frozen
        # first layer makes the rest of the run cheaper (no gradient for it at all).
        self.bias.requires_grad_(trainable)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight.to(x.dtype), self.bias.to(x.dtype))


# ---------------------------------------------------------------------------------------------
# Network pieces


def frozen_scale_batchnorm(channels: int, momentum: float = 0.4, eps: float = 1e-12) -> nn.BatchNorm2d:
    """Batch norm with its scale fixed at 1, only the shift learnable: the following conv
    (bias-free, scale-invariant through the next batch norm) makes a learnable scale redundant.
    ``momentum`` is PyTorch's (the weight of the new batch statistics): 0.4 is fast, which the
    lookahead needs (the running statistics must follow the weights it pulls back)."""
    bn = nn.BatchNorm2d(channels, eps=eps, momentum=momentum)
    bn.weight.requires_grad_(False)
    return bn


@torch.no_grad()
def identity_init_(conv: nn.Conv2d) -> nn.Conv2d:
    """Default init, then the first ``in_channels`` filters replaced by identity (Dirac) kernels:
    each layer starts by passing its input through, an implicit residual path."""
    conv.reset_parameters()
    n = min(conv.in_channels, conv.out_channels)
    nn.init.dirac_(conv.weight[:n])
    return conv


# ---------------------------------------------------------------------------------------------
# Optimisation


def decoupled_sgd(groups: Iterable[tuple[list[nn.Parameter], float, float]], momentum: float,
                  fused: bool | None = None) -> torch.optim.SGD:
    """Nesterov SGD from ``(params, lr, decay)`` groups, where ``decay`` is the fraction of each
    weight removed per step at the peak of the schedule, whatever the group's ``lr``.

    PyTorch's SGD decays by ``lr * weight_decay``; passing ``decay / lr`` as ``weight_decay``
    makes the decay follow the schedule (both scale with the schedule's factor) but not the
    learning-rate setting: lr and decay are tuned independently, and the 64x larger step of
    the batch-norm shifts does not decay them 64x faster.
    """
    param_groups = [{"params": params, "lr": lr, "weight_decay": decay / lr}
                    for params, lr, decay in groups if params]
    return torch.optim.SGD(param_groups, lr=param_groups[0]["lr"], momentum=momentum, nesterov=True,
                           fused=fused)


def triangular_lr(step: int, total: int, warmup: float, start: float, end: float) -> float:
    """Learning-rate factor: linear from ``start`` to 1 over the first ``warmup`` fraction of
    ``total`` steps, then linear down to ``end`` at ``total``."""
    peak_at = max(1, int(warmup * total))
    if step < peak_at:
        return start + (1 - start) * step / peak_at
    return max(end, 1 + (end - 1) * (step - peak_at) / max(1, total - peak_at))


def smoothed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                           smoothing: float = LABEL_SMOOTHING) -> torch.Tensor:
    """Mean cross-entropy against targets that keep ``1 - smoothing`` on the label and spread
    ``smoothing`` evenly over all classes: the net is never pushed to infinite confidence."""
    return F.cross_entropy(logits.float(), labels, label_smoothing=smoothing)


def lookahead_decay(step: int, total: int, every: int = 5, base: float = 0.95, power: float = 3.0) -> float:
    """The lookahead's decay at ``step``: ``base`` per step compounded over the ``every`` steps
    between updates, scaled by ``(step / total) ** power``: nearly no averaging early (the weights
    move fast), strong averaging at the end."""
    return base ** every * (min(step, total) / total) ** power


class Lookahead:
    """Slow weights: an exponential moving average of every floating-point entry of the model's
    state (parameters and batch-norm statistics). :meth:`update` moves the average toward the
    model by ``1 - decay`` and then resets the model to the average (the fast weights restart
    from the slow ones, as in the Lookahead optimiser)."""

    def __init__(self, model: nn.Module) -> None:
        self.reset(model)

    def _tensors(self, model: nn.Module) -> list[torch.Tensor]:
        return [t for t in model.state_dict().values() if t.is_floating_point()]

    @torch.no_grad()
    def reset(self, model: nn.Module) -> None:
        """Slow weights = the model's now (where the averaging starts)."""
        self.slow = [t.detach().clone() for t in self._tensors(model)]

    def state(self) -> list[torch.Tensor]:
        """For a checkpoint: the fast weights run on between updates (an epoch rarely ends on
        one), so a resume needs the slow ones too."""
        return self.slow

    @torch.no_grad()
    def load_state(self, slow: list[torch.Tensor]) -> None:
        if len(slow) != len(self.slow):
            raise ValueError(f"lookahead state of {len(slow)} tensors for a model of {len(self.slow)}")
        for mine, saved in zip(self.slow, slow, strict=True):
            mine.copy_(saved)

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float) -> None:
        fast = self._tensors(model)
        torch._foreach_lerp_(self.slow, fast, 1.0 - decay)
        torch._foreach_copy_(fast, self.slow)


# ---------------------------------------------------------------------------------------------
# Augmentation


class AlternatingFlip:
    """Which images are mirrored in which epoch: a seeded random half in even epochs, exactly the
    other half in odd ones, so every image is seen both ways every two epochs (random flips leave
    a quarter of the images unflipped, or flipped, two epochs running). A function of the seed
    and the epoch only: a resumed run flips as the uninterrupted one would."""

    def __init__(self, n: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.first = torch.zeros(n, dtype=torch.bool)
        self.first[torch.randperm(n, generator=generator)[: n // 2]] = True

    def mask(self, epoch: int, device: torch.device | str = "cpu") -> torch.Tensor:
        return (self.first if epoch % 2 == 0 else ~self.first).to(device)


def flip_where(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """NCHW ``images`` mirrored left-right where ``mask`` (N,) is true."""
    return torch.where(mask.view(-1, 1, 1, 1), images.flip(3), images)


def random_translate(padded: torch.Tensor, pad: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each image of a reflect-``pad``-ded NCHW batch cropped back to its original size at a random
    offset of -pad..pad pixels per axis (drawn per image). Rows, then columns, are picked by
    ``2 * pad + 1`` whole-tensor selects: no host sync, no per-image Python, one pass per offset."""
    if not pad:
        return padded.clone()
    n, _, hp, wp = padded.shape
    h, w = hp - 2 * pad, wp - 2 * pad
    dy = torch.randint(0, 2 * pad + 1, (n, 1, 1, 1), device=padded.device, generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n, 1, 1, 1), device=padded.device, generator=generator)
    rows = padded[:, :, 0:h, :]
    for k in range(1, 2 * pad + 1):
        rows = torch.where(dy == k, padded[:, :, k:k + h, :], rows)
    out = rows[:, :, :, 0:w]
    for k in range(1, 2 * pad + 1):
        out = torch.where(dx == k, rows[:, :, :, k:k + w], out)
    return out


def cutout(images: torch.Tensor, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A ``size`` x ``size`` square of each NCHW image, at a random place wholly inside it, set to
    0 (the mean, on normalised images)."""
    if not size:
        return images
    n, _, h, w = images.shape
    top = torch.randint(0, h - size + 1, (n, 1, 1, 1), device=images.device, generator=generator)
    left = torch.randint(0, w - size + 1, (n, 1, 1, 1), device=images.device, generator=generator)
    ys = torch.arange(h, device=images.device).view(1, 1, h, 1)
    xs = torch.arange(w, device=images.device).view(1, 1, 1, w)
    inside = (ys >= top) & (ys < top + size) & (xs >= left) & (xs < left + size)
    return images.masked_fill(inside, 0)


# ---------------------------------------------------------------------------------------------
# Test-time augmentation


def tta_views(x: torch.Tensor, level: int, flip: bool = True) -> list[tuple[torch.Tensor, float]]:
    """The views of NCHW ``x`` that :func:`tta_logits` averages, with their weights (sum 1).
    Level 0: ``x``; 1: ``x`` and its mirror image (when ``flip``); 2: also ``x`` shifted by one
    pixel up-left and down-right (reflect padding) and their mirrors, the shifted views together
    weighing as much as the unshifted ones (they lose a pixel row and column each)."""
    base = [x, x.flip(3)] if flip and level >= 1 else [x]
    if level < 2:
        return [(v, 1 / len(base)) for v in base]
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    h, w = x.shape[2], x.shape[3]
    shifted = [padded[:, :, 0:h, 0:w], padded[:, :, 2:h + 2, 2:w + 2]]
    if flip:
        shifted += [v.flip(3) for v in shifted]
    return [(v, 0.5 / len(base)) for v in base] + [(v, 0.5 / len(shifted)) for v in shifted]


def tta_logits(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, level: int,
               flip: bool = True) -> torch.Tensor:
    """The weighted mean of ``model``'s logits over :func:`tta_views` (float32)."""
    total = None
    for view, weight in tta_views(x, level, flip):
        logits = model(view).float() * weight
        total = logits if total is None else total + logits
    return total
