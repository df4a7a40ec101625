"""``train``, ``evaluate`` and ``compare``: the library functions behind the CLI commands."""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch

from attnconv.analysis import profiling
from attnconv.analysis.profiling import count_macs, count_params
from attnconv.classification.config import ClassificationConfig
from attnconv.classification.data import ClassificationData, Datasets, build_datasets
from attnconv.classification.loading import load_trained
from attnconv.classification.models import build_model
from attnconv.classification.module import Classifier
from attnconv.classification.report import (
    difference_text,
    mean_std_text,
    plot_comparison,
    plot_training_curves,
)
from attnconv.engine.callbacks import Throughput
from attnconv.engine.config import ConfigError, apply
from attnconv.engine.progress import JobProgress
from attnconv.engine.run import Fitted, Task, fit
from attnconv.engine.tables import markdown_table
from attnconv.engine.trainer import (
    SavedEpoch,
    check_run_dir,
    evaluation_trainer,
    quiet_lightning,
    result_note,
    run_dir_path,
)
from attnconv.pretrained import init_from

__all__ = ["Comparison", "RunResult", "compare", "comparison_table", "evaluate",
           "summary_table", "train"]

SUMMARY_HEADERS = ("model", "top-1 (%)", "top-5 (%)", "val loss", "params (M)", "MACs (M)",
                   "train img/s")


@dataclass
class RunResult:
    model: str
    seed: int
    top1: float
    top5: float
    loss: float
    params: int
    macs: int
    img_per_s: float
    run_dir: Path
    best_checkpoint: Path | None
    plot: Path | None
    #: The checkpoint the figures above are from (the last epoch's) and the best one.
    last: SavedEpoch | None = None
    best: SavedEpoch | None = None
    max_epochs: int = 0

    def note(self) -> str:
        """Which epoch and file the figures are from, and the best epoch's when another."""
        return result_note(self.last, self.best, self.max_epochs, "top-1", scale=100)

    def row(self) -> tuple:
        return (self.model, self.top1, self.top5, self.loss, self.params / 1e6,
                self.macs / 1e6, self.img_per_s)


def _model_cost(model: torch.nn.Module, sets: Datasets) -> tuple[int, int]:
    x = torch.zeros(1, sets.in_chans, sets.image_size, sets.image_size)
    was_training = model.training
    model.eval()
    macs = count_macs(model, x)
    model.train(was_training)
    return count_params(model), macs


def model_summary(models: dict[str, torch.nn.Module], sets: Datasets) -> str:
    """The table printed before training (:func:`attnconv.analysis.profiling.model_table`) at the
    data's input size."""
    size = f"{sets.in_chans}x{sets.image_size}x{sets.image_size}"
    return profiling.model_table(
        models.items(), torch.zeros(1, sets.in_chans, sets.image_size, sets.image_size),
        input_label=f"{size} image")


class Classification(Task[ClassificationConfig, RunResult]):
    """Image classification's hooks of the run template."""

    monitor = "val_top1"
    val_loss = "val_loss"

    def __init__(self, config: ClassificationConfig, sets: Datasets | None = None) -> None:
        super().__init__(config)
        self.sets = sets
        self.cost = (0, 0)

    def callbacks(self) -> list[L.Callback]:
        return [Throughput()]

    def data(self, run_dir: Path) -> Datasets:
        return self.sets or build_datasets(self.config.data)

    def module(self, sets: Datasets, load_init: bool) -> tuple[Classifier, str]:
        cfg = self.config
        model = build_model(cfg.model, sets.num_classes, sets.in_chans, **cfg.model_args)
        if cfg.init and load_init:
            print(init_from(model, cfg.init))
        self.cost = _model_cost(model, sets)
        meta = {"config": cfg.to_dict(), "num_classes": sets.num_classes,
                "in_chans": sets.in_chans, "image_size": sets.image_size}
        module = Classifier(model, sets.num_classes, cfg.optim, cfg.trainer.max_epochs,
                            channels_last=cfg.channels_last, compile=cfg.compile, meta=meta)
        return module, model_summary({cfg.model: model}, sets)

    def loaders(self, sets: Datasets) -> dict[str, Any]:
        return {"datamodule": ClassificationData(self.config.data, sets)}

    def finish(self, fitted: Fitted) -> RunResult:
        cfg, trainer, run_dir = self.config, fitted.trainer, fitted.run_dir
        plot = None
        if trainer.is_global_zero:
            csv_paths = sorted(run_dir.glob("logs*/metrics.csv"))
            if csv_paths:
                plot = plot_training_curves(csv_paths, run_dir / "curves.png", title=cfg.model)
        m = trainer.callback_metrics
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback \
            else ""
        return RunResult(cfg.model, cfg.seed, 100 * float(m.get("val_top1", float("nan"))),
                         100 * float(m.get("val_top5", float("nan"))),
                         float(m.get("val_loss", float("nan"))), *self.cost,
                         float(m.get("train_img_per_s", float("nan"))), run_dir,
                         Path(best) if best else None, plot, fitted.last, fitted.best,
                         cfg.trainer.max_epochs)


def train(cfg: ClassificationConfig, callbacks: Sequence[L.Callback] = (),
          progress: JobProgress | None = None) -> RunResult:
    """Train ``cfg.model`` as ``cfg`` says; checkpoints, logs and plot go to the run folder.

    ``progress``: the bar of a larger job (compare) this run is part of; without it the run
    prints its model table and draws its own bar.

    Bad input (data, model name, resume path) raises before any training step.
    """
    return fit(Classification(cfg), callbacks, progress)


def evaluate(checkpoint: str | Path, data_overrides: dict[str, Any] | None = None,
             accelerator: str = "auto") -> dict[str, float]:
    """Top-1, top-5 (in %) and loss of a ``attnconv train`` checkpoint on its validation set.

    ``data_overrides`` (e.g. ``{"root": ...}``) change the data section stored in the checkpoint.
    """
    quiet_lightning()
    trained = load_trained(checkpoint)
    meta, cfg = trained.meta, trained.config
    if data_overrides:
        cfg = apply(cfg, {"data": data_overrides}, where="data overrides")
    sets = build_datasets(cfg.data)
    module = Classifier(trained.model, meta["num_classes"], cfg.optim, cfg.trainer.max_epochs)
    trainer = evaluation_trainer(accelerator)
    start = time.perf_counter()
    (m,) = trainer.validate(module, datamodule=ClassificationData(cfg.data, sets), verbose=False)
    seconds = time.perf_counter() - start
    return {"model": cfg.model, "top1": 100 * m["val_top1"], "top5": 100 * m["val_top5"],
            "loss": m["val_loss"], "images": len(sets.val), "img_per_s": len(sets.val) / seconds}


@dataclass
class Comparison:
    results: dict[str, list[RunResult]]
    table: str
    plot: Path


# No training speed: runs timed one after another are not comparable on a busy machine
# (attnconv bench and the demo time the models side by side).
COMPARE_HEADERS = ("model", "top-1 (%) mean ± std", "Δ top-1 vs first [95% CI]", "top-5 (%)",
                   "params (M)", "MACs (M)", "seeds")


def compare(models: Sequence[str], seeds: int, cfg: ClassificationConfig) -> Comparison:
    """Train every model with seeds ``cfg.seed .. cfg.seed + seeds - 1`` under ``cfg``.

    The difference to the first model comes with a Welch t 95% interval over the seeds.
    """
    if seeds < 1:
        raise ConfigError(f"seeds must be >= 1, not {seeds}")
    if not models:
        raise ConfigError("compare needs at least one model name")
    folder = run_dir_path(cfg.out_dir, cfg.name or "compare")
    runs = {name: [dataclasses.replace(cfg, model=name, seed=seed, out_dir=str(folder),
                                       name=f"{name}-s{seed}", resume=None)
                   for seed in range(cfg.seed, cfg.seed + seeds)] for name in models}
    for configs in runs.values():  # every run is checked before the first one trains
        configs[0].check()
        for run in configs:
            check_run_dir(folder / run.run_name, run, resuming=False, can_resume=False)
    sets = build_datasets(cfg.data)
    with JobProgress("compare", len(models) * seeds, detail=cfg.trainer.progress_bar) as job:
        return _compare(runs, cfg, job, sets, folder)


def _compare(runs: dict[str, list[ClassificationConfig]], cfg: ClassificationConfig,
             job: JobProgress, sets: Datasets, folder: Path) -> Comparison:
    job.write(model_summary({name: build_model(name, sets.num_classes, sets.in_chans,
                                               **cfg.model_args) for name in runs}, sets))
    results: dict[str, list[RunResult]] = {}
    for name, configs in runs.items():
        for run in configs:
            results.setdefault(name, []).append(fit(Classification(run, sets), progress=job,
                                                      checked=True))
    seeds = len(next(iter(runs.values())))
    table = comparison_table(results)
    plot = plot_comparison({n: [r.top1 for r in rs] for n, rs in results.items()},
                           folder / "compare.png",
                           title=f"{cfg.data.name}, {cfg.trainer.max_epochs} epochs, "
                                 f"{seeds} seed{'s' * (seeds > 1)}")
    (folder / "compare.md").write_text(table + "\n")
    return Comparison(results, table, plot)


def comparison_table(results: dict[str, list[RunResult]]) -> str:
    """COMPARE_HEADERS rows, one per model, in the order of ``results``."""
    first = [r.top1 for r in next(iter(results.values()))]
    rows = []
    for i, (name, runs) in enumerate(results.items()):
        top1 = [r.top1 for r in runs]
        delta = "—" if i == 0 else difference_text(first, top1)
        rows.append((name, mean_std_text(top1), delta,
                     f"{statistics.fmean(r.top5 for r in runs):.2f}", runs[0].params / 1e6,
                     runs[0].macs / 1e6, len(runs)))
    return markdown_table(COMPARE_HEADERS, rows)


def summary_table(results: Sequence[RunResult]) -> str:
    """SUMMARY_HEADERS rows for finished runs."""
    return markdown_table(SUMMARY_HEADERS, [r.row() for r in results])
