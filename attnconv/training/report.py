"""What a run leaves for people to read: summary tables, training-curve and comparison plots,
and the confidence interval of a difference in accuracy."""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: training machines have no display
import matplotlib.pyplot as plt


def read_epoch_metrics(csv_paths: Sequence[str | Path]) -> dict[str, list[tuple[int, float]]]:
    """Per-epoch values of each metric in Lightning CSVLogger ``metrics.csv`` files (the parts
    of a resumed run, in order: a later part's value for an epoch wins)."""
    series: dict[str, dict[int, float]] = {}
    rows = []
    for path in csv_paths:
        with open(path, newline="") as f:
            rows += list(csv.DictReader(f))
    for row in rows:
        if not row.get("epoch"):
            continue
        epoch = int(float(row["epoch"]))
        for key, value in row.items():
            if key in {"epoch", "step"} or not value or key.endswith("_step"):
                continue
            series.setdefault(key.removesuffix("_epoch"), {})[epoch] = float(value)
    return {k: sorted(v.items()) for k, v in series.items()}


def plot_training_curves(csv_paths: Sequence[str | Path], png_path: str | Path,
                         title: str = "") -> Path:
    """Loss and top-1 accuracy per epoch, train and validation, side by side."""
    metrics = read_epoch_metrics(csv_paths)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, names, label in ((ax_loss, ("train_loss", "val_loss"), "loss"),
                             (ax_acc, ("train_top1", "val_top1", "val_top5"), "accuracy")):
        for name in names:
            if name in metrics:
                epochs, values = zip(*metrics[name], strict=True)
                ax.plot(epochs, values, marker="o", label=name)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return Path(png_path)


def welch_interval(a: Sequence[float], b: Sequence[float],
                   confidence: float = 0.95) -> tuple[float, float, float]:
    """mean(b) - mean(a) and its Welch t confidence interval (low, high).

    With fewer than two values on a side the spread is unknown and the interval is infinite.
    """
    from scipy.stats import t  # scipy comes with scikit-learn, a dependency

    diff = statistics.fmean(b) - statistics.fmean(a)
    if len(a) < 2 or len(b) < 2:
        return diff, -math.inf, math.inf
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return diff, diff, diff
    dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = t.ppf(0.5 + confidence / 2, dof) * se
    return diff, diff - half, diff + half


def plot_comparison(top1: dict[str, Sequence[float]], png_path: str | Path,
                    title: str = "") -> Path:
    """Bars of mean top-1 per model with ± one standard deviation and every seed as a dot."""
    names = list(top1)
    means = [statistics.fmean(top1[n]) for n in names]
    stds = [statistics.stdev(top1[n]) if len(top1[n]) > 1 else 0.0 for n in names]
    fig, ax = plt.subplots(figsize=(1.8 * len(names) + 2, 4))
    ax.bar(names, means, yerr=stds, capsize=6, color="#8fb3d9", edgecolor="#2b5d8c")
    for i, n in enumerate(names):
        ax.plot([i] * len(top1[n]), top1[n], "o", color="#2b5d8c", markersize=4)
    low = min(min(v) for v in top1.values())
    ax.set_ylim(max(0.0, low - 5), min(100.0, max(means) + max(stds) + 2))
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return Path(png_path)
