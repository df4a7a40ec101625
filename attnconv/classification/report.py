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
    """What the comparison table says, drawn. Left: mean top-1 of each model as a bar on an
    axis from 0 to 100%, with ± one standard deviation as an error bar and every seed's value
    as a dot beside the bar (one seed: the bar alone). Right, with two models or more: the
    difference in mean top-1 to the first model with its Welch 95% interval
    (:func:`welch_interval`), around a line at 0; a single seed has no interval, and the
    panel says so."""
    names = list(top1)
    means = [statistics.fmean(top1[n]) for n in names]
    width = 1.8 * len(names) + 2
    if len(names) > 1:
        fig, (ax, delta_ax) = plt.subplots(
            1, 2, figsize=(width + 1.6 * len(names), 4),
            gridspec_kw={"width_ratios": [len(names) + 1, len(names)]})
    else:
        fig, ax = plt.subplots(figsize=(width, 4))
    ax.bar(range(len(names)), means, width=BAR_WIDTH, color="#8fb3d9", edgecolor="#2b5d8c",
           label="mean")
    for i, n in enumerate(names):
        ax.annotate(f"{means[i]:.2f}", (i, means[i]), xytext=(0, 3), textcoords="offset points",
                    ha="center", va="bottom", fontsize=8)
        if len(top1[n]) < 2:
            continue
        ax.errorbar(i, means[i], yerr=statistics.stdev(top1[n]), color="#2b5d8c", capsize=6,
                    label="± 1 std" if i == 0 else None)
        ax.plot([i + DOT_OFFSET] * len(top1[n]), top1[n], "o", color="#2b5d8c", markersize=4,
                label="each seed" if i == 0 else None)
    ax.set_xticks(range(len(names)), names)
    ax.set_xlim(-0.6, len(names) - 1 + 0.6)
    ax.set_ylim(0, 100)  # a bar's length is its accuracy: the axis starts at 0
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    if any(len(v) > 1 for v in top1.values()):
        ax.legend(loc="lower right", fontsize=8)
    if len(names) > 1:
        _difference_panel(delta_ax, top1)
    fig.tight_layout()
    return fig


def _difference_panel(ax: plt.Axes, top1: dict[str, Sequence[float]]) -> None:
    """Δ mean top-1 to the first model with its Welch 95% interval, one point per model."""
    names = list(top1)
    first = top1[names[0]]
    ends = [0.0]
    for j, name in enumerate(names[1:]):
        diff, low, high = welch_interval(first, top1[name])
        if math.isfinite(low):
            ax.errorbar(j, diff, yerr=[[diff - low], [high - diff]], fmt="o", color="#2b5d8c",
                        capsize=6)
            ends += [low, high]
        else:
            ax.plot(j, diff, "o", color="#2b5d8c")
            ends.append(diff)
        ax.annotate(difference_text(first, top1[name]).replace(" (", "\n("), (j, diff),
                    xytext=(8, 0), textcoords="offset points", va="center", fontsize=8)
    ax.axhline(0, color="0.4", linewidth=1, linestyle="--")
    pad = 0.1 * (max(ends) - min(ends)) or 1.0
    ax.set_ylim(min(ends) - pad, max(ends) + pad)
    ax.set_xticks(range(len(names) - 1), names[1:])
    ax.set_xlim(-0.5, len(names) - 1.5 + 1.0)  # room for the numbers right of the last point
    ax.set_ylabel(f"Δ top-1 vs {names[0]} (points)")
    ax.set_title("difference, Welch 95% interval", fontsize=9)
    ax.grid(axis="y", alpha=0.3)


def plot_comparison(top1: dict[str, Sequence[float]], png_path: str | Path,
                    title: str = "") -> Path:
    """:func:`comparison_figure` as a PNG."""
    return _write(comparison_figure(top1, title), png_path)
