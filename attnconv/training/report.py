"""What a run leaves for people to read: summary tables, training-curve and comparison plots,
and the confidence interval of a difference in accuracy.

The ``*_figure`` functions build the matplotlib figure (tests read the drawn data back from
it); the ``plot_*`` functions write it to a PNG.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: training machines have no display
import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


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


def training_curves_figure(metrics: dict[str, list[tuple[int, float]]], title: str = ""
                           ) -> Figure:
    """Loss and top-1 accuracy per epoch (from :func:`read_epoch_metrics`), train and
    validation, side by side; epochs are whole numbers on the axis."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, names, label in ((ax_loss, ("train_loss", "val_loss"), "loss"),
                             (ax_acc, ("train_top1", "val_top1", "val_top5"), "accuracy")):
        for name in names:
            if name in metrics:
                epochs, values = zip(*metrics[name], strict=True)
                ax.plot(epochs, values, marker="o", label=name)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no "epoch 0.5" on short runs
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _write(fig: Figure, png_path: str | Path) -> Path:
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return Path(png_path)


def plot_training_curves(csv_paths: Sequence[str | Path], png_path: str | Path,
                         title: str = "") -> Path:
    """:func:`training_curves_figure` of Lightning ``metrics.csv`` files, as a PNG."""
    return _write(training_curves_figure(read_epoch_metrics(csv_paths), title), png_path)


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


def mean_std_text(values: Sequence[float]) -> str:
    """"mean ± std" of ``values``; only the value when there is one (its spread is unknown)."""
    if len(values) < 2:
        return f"{statistics.fmean(values):.2f}"
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"


def difference_text(first: Sequence[float], values: Sequence[float]) -> str:
    """mean(values) - mean(first) with its Welch 95% interval (:func:`welch_interval`), or
    without one when a side has a single value."""
    diff, low, high = welch_interval(first, values)
    if not math.isfinite(low):
        return f"{diff:+.2f} (one seed: no interval)"
    return f"{diff:+.2f} [{low:+.2f}, {high:+.2f}]"


#: Where a model's seed dots sit, right of its bar (bars span x ± BAR_WIDTH / 2).
BAR_WIDTH, DOT_OFFSET = 0.5, 0.38


def comparison_figure(top1: dict[str, Sequence[float]], title: str = "") -> Figure:
    """Bars of mean top-1 per model; with several seeds, ± one standard deviation as an error
    bar and every seed's value as a dot beside the bar (one seed: the bar alone)."""
    names = list(top1)
    means = [statistics.fmean(top1[n]) for n in names]
    fig, ax = plt.subplots(figsize=(1.8 * len(names) + 2, 4))
    ax.bar(range(len(names)), means, width=BAR_WIDTH, color="#8fb3d9", edgecolor="#2b5d8c",
           label="mean")
    top = max(means)
    for i, n in enumerate(names):
        if len(top1[n]) < 2:
            continue
        std = statistics.stdev(top1[n])
        ax.errorbar(i, means[i], yerr=std, color="#2b5d8c", capsize=6,
                    label="± 1 std" if i == 0 else None)
        ax.plot([i + DOT_OFFSET] * len(top1[n]), top1[n], "o", color="#2b5d8c", markersize=4,
                label="each seed" if i == 0 else None)
        top = max(top, means[i] + std, *top1[n])
    ax.set_xticks(range(len(names)), names)
    ax.set_xlim(-0.6, len(names) - 1 + 0.6)
    low = min(min(v) for v in top1.values())
    ax.set_ylim(max(0.0, low - 5), min(100.0, top + 2))
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    if any(len(v) > 1 for v in top1.values()):
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return fig


def plot_comparison(top1: dict[str, Sequence[float]], png_path: str | Path,
                    title: str = "") -> Path:
    """:func:`comparison_figure` as a PNG."""
    return _write(comparison_figure(top1, title), png_path)
