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

from attnconv import profiling
from attnconv.classification.config import ConfigError, RunConfig, apply, check_model_args
from attnconv.classification.data import ClassificationData, Datasets, build_datasets
from attnconv.classification.loading import Trained, is_trained_checkpoint, load_model, load_trained
from attnconv.classification.models import build_model, check_model_name
from attnconv.classification.module import Classifier
from attnconv.classification.report import (
    difference_text,
    mean_std_text,
    plot_comparison,
    plot_training_curves,
)
from attnconv.engine.callbacks import Throughput
from attnconv.engine.progress import JobProgress
from attnconv.engine.trainer import (
    NonFiniteLossError,
    SavedEpoch,
    check_devices,
    check_run_dir,
    claim_run_dir,
    evaluation_trainer,
    make_trainer,
    quiet_lightning,
    result_note,
    resume_notes,
    resume_path,
    run_dir_path,
    saved_epochs,
    stopped_note,
)
from attnconv.pretrained import init_from
from attnconv.profiling import count_macs, count_params, markdown_table

# Re-exported: they lived here before attnconv.classification.loading.
__all__ = ["Comparison", "RunResult", "Trained", "compare", "comparison_table", "evaluate",
           "is_trained_checkpoint", "load_model", "load_trained", "summary_table", "train"]

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


def _meta(cfg: RunConfig, sets: Datasets) -> dict[str, Any]:
    return {"config": cfg.to_dict(), "num_classes": sets.num_classes, "in_chans": sets.in_chans,
            "image_size": sets.image_size}


def _model_cost(model: torch.nn.Module, sets: Datasets) -> tuple[int, int]:
    x = torch.zeros(1, sets.in_chans, sets.image_size, sets.image_size)
    was_training = model.training
    model.eval()
    macs = count_macs(model, x)
    model.train(was_training)
    return count_params(model), macs


def model_summary(models: dict[str, torch.nn.Module], sets: Datasets) -> str:
    """The table printed before training (:func:`attnconv.profiling.model_table`) at the
    data's input size."""
    size = f"{sets.in_chans}x{sets.image_size}x{sets.image_size}"
    return profiling.model_table(
        models.items(), torch.zeros(1, sets.in_chans, sets.image_size, sets.image_size),
        input_label=f"{size} image")


def train(cfg: RunConfig, callbacks: Sequence[L.Callback] = (),
          progress: JobProgress | None = None) -> RunResult:
    """Train ``cfg.model`` as ``cfg`` says; checkpoints, logs and plot go to the run folder.

    ``progress``: the bar of a larger job (compare) this run is part of; without it the run
    prints its model table and draws its own bar.

    Bad input (data, model name, resume path) raises before any training step.
    """
    quiet_lightning()
    check_devices(cfg.trainer)
    check_model_name(cfg.model)
    check_model_args(cfg.model_args)
    sets = build_datasets(cfg.data)
    run_dir = run_dir_path(cfg.out_dir, cfg.name or f"{cfg.model}-s{cfg.seed}")
    resume = resume_path(cfg.resume, run_dir)
    for note in resume_notes(resume, cfg.to_dict()):
        print(f"resume: applying {note}")
    check_run_dir(run_dir, resuming=resume is not None, overwrite=cfg.overwrite,
                  asked=cfg.to_dict())
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    model = build_model(cfg.model, sets.num_classes, sets.in_chans, **cfg.model_args)
    if cfg.init and resume is None:  # a resumed run's checkpoint holds the weights
        print(init_from(model, cfg.init))
    params, macs = _model_cost(model, sets)
    job = progress or JobProgress(f"train {cfg.model}", detail=cfg.trainer.progress_bar)
    if progress is None:
        job.write(model_summary({cfg.model: model}, sets))
    module = Classifier(model, sets.num_classes, cfg.optim, cfg.trainer.max_epochs,
                        channels_last=cfg.trainer.channels_last, compile=cfg.trainer.compile,
                        meta=_meta(cfg, sets))
    try:
        with claim_run_dir(run_dir, resuming=resume is not None, overwrite=cfg.overwrite,
                           asked=cfg.to_dict()):
            trainer = make_trainer(cfg.trainer, run_dir, monitor="val_top1", mode="max",
                                   val_loss="val_loss",
                                   callbacks=[Throughput(),
                                              job.callback(f"{cfg.model} s{cfg.seed}"),
                                              *callbacks],
                                   resuming=resume is not None)
            job.bar.refresh()  # the trainer is accepted: the bar shows from here
            try:
                trainer.fit(module, datamodule=ClassificationData(cfg.data, sets),
                            ckpt_path=resume)
            except NonFiniteLossError as err:
                raise NonFiniteLossError(f"{err}; {stopped_note(run_dir)}") from None
            plot = None
            if trainer.is_global_zero:
                csv_paths = sorted(run_dir.glob("logs*/metrics.csv"))
                if csv_paths:
                    plot = plot_training_curves(csv_paths, run_dir / "curves.png",
                                                title=cfg.model)
    finally:
        if progress is None:
            job.close()
    m = trainer.callback_metrics
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    last_saved, best_saved = saved_epochs(trainer, run_dir, "val_top1")
    return RunResult(cfg.model, cfg.seed, 100 * float(m.get("val_top1", float("nan"))),
                     100 * float(m.get("val_top5", float("nan"))),
                     float(m.get("val_loss", float("nan"))), params, macs,
                     float(m.get("train_img_per_s", float("nan"))), run_dir,
                     Path(best) if best else None, plot, last_saved, best_saved,
                     cfg.trainer.max_epochs)


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


def compare(models: Sequence[str], seeds: int, cfg: RunConfig) -> Comparison:
    """Train every model with seeds ``cfg.seed .. cfg.seed + seeds - 1`` under ``cfg``.

    The difference to the first model comes with a Welch t 95% interval over the seeds.
    """
    if seeds < 1:
        raise ConfigError(f"seeds must be >= 1, not {seeds}")
    if not models:
        raise ConfigError("compare needs at least one model name")
    for name in models:  # every name is checked before the first model trains (or a bar shows)
        check_model_name(name)
    check_model_args(cfg.model_args)
    sets = build_datasets(cfg.data)
    folder = run_dir_path(cfg.out_dir, cfg.name or "compare")
    for name in models:  # every run folder is checked before the first model trains
        for seed in range(cfg.seed, cfg.seed + seeds):
            check_run_dir(folder / f"{name}-s{seed}", resuming=False, overwrite=cfg.overwrite,
                          can_resume=False)
    with JobProgress("compare", len(models) * seeds, detail=cfg.trainer.progress_bar) as job:
        return _compare(models, seeds, cfg, job, sets, folder)


def _compare(models: Sequence[str], seeds: int, cfg: RunConfig, job: JobProgress,
             sets: Datasets, folder: Path) -> Comparison:
    job.write(model_summary({name: build_model(name, sets.num_classes, sets.in_chans,
                                               **cfg.model_args) for name in models}, sets))
    results: dict[str, list[RunResult]] = {}
    for name in models:
        for seed in range(cfg.seed, cfg.seed + seeds):
            run = dataclasses.replace(cfg, model=name, seed=seed, out_dir=str(folder),
                                      name=f"{name}-s{seed}", resume=None)
            results.setdefault(name, []).append(train(run, progress=job))
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
