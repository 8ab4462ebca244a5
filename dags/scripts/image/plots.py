"""Artifacts of an image run: learning curves, confusion matrix, misclassified test images."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from scripts.image.base import EpochResult


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def confusion(labels: np.ndarray, predictions: np.ndarray, classes: int) -> np.ndarray:
    matrix = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(matrix, (labels, predictions), 1)
    return matrix


def plot_learning_curves(history: Sequence[EpochResult], path: str) -> None:
    plt = _pyplot()
    epochs = [h.epoch for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.plot(epochs, [h.train_loss for h in history], marker="o")
    left.set(xlabel="epoch", ylabel="training loss", title="Training loss")
    right.plot(epochs, [h.val_accuracy for h in history], marker="o", color="C1")
    right.set(xlabel="epoch", ylabel="accuracy", title="Test accuracy after each epoch")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_confusion(matrix: np.ndarray, classes: Sequence[str], path: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 6))
    image = ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix (test set)")
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, str(count), ha="center", va="center", fontsize=7,
                color="white" if count > matrix.max() / 2 else "black")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_misclassified(images: np.ndarray, labels: np.ndarray, predictions: np.ndarray,
                       classes: Sequence[str], path: str, limit: int = 36) -> int:
    """A grid of up to ``limit`` misclassified test images, titled true -> predicted."""
    plt = _pyplot()
    wrong = np.flatnonzero(labels != predictions)[:limit]
    cols = 6
    rows = max(1, (len(wrong) + cols - 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.6, rows * 1.8), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, wrong, strict=False):
        img = images[i]
        ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None)
        ax.set_title(f"{classes[labels[i]]} -> {classes[predictions[i]]}", fontsize=7)
    fig.suptitle(f"Misclassified test images ({len(np.flatnonzero(labels != predictions))} in all)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return len(wrong)
