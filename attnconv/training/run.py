"""``train``, ``evaluate`` and ``compare``: the library functions behind the CLI commands."""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from attnconv.profiling import count_macs, count_params, markdown_table
from attnconv.training.callbacks import RNGState, Throughput
from attnconv.training.checkpoint import SafeCheckpointIO
from attnconv.training.config import RunConfig, apply
from attnconv.training.data import ClassificationData, Datasets, build_datasets
from attnconv.training.models import build_model, check_model_name
from attnconv.training.module import Classifier
from attnconv.training.report import (
    difference_text,
    mean_std_text,
    plot_comparison,
    plot_training_curves,
)
from attnconv.weights import read_state_dict, safe_load

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

    def row(self) -> tuple:
        return (self.model, self.top1, self.top5, self.loss, self.params / 1e6,
                self.macs / 1e6, self.img_per_s)


def quiet_lightning() -> None:
    """Keep Lightning's start-up notices and small-data warnings out of the user's output."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    for message in (".*does not have many workers.*", ".*smaller than the logging interval.*",
                    ".*LeafSpec.*", ".*isinstance.*treespec.*"):
        warnings.filterwarnings("ignore", message=message)


def _resume_path(cfg: RunConfig, run_dir: Path) -> Path | None:
    if not cfg.resume:
        return None
    path = run_dir / "checkpoints" / "last.ckpt" if cfg.resume == "last" else Path(cfg.resume)
    if not path.is_file():
        raise FileNotFoundError(f"resume checkpoint {path} does not exist")
    return path


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


def _csv_version(run_dir: Path, resuming: bool) -> str:
    # CSVLogger empties a folder it reuses: a resumed run writes next to the earlier part.
    if not resuming:
        return "logs"
    n = 1
    while (run_dir / f"logs-{n}").exists():
        n += 1
    return f"logs-{n}"


def make_trainer(cfg: RunConfig, run_dir: Path, callbacks: Sequence[L.Callback] = (),
                 loggers: bool = True) -> L.Trainer:
    t = cfg.trainer
    checkpoint = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best",
                                 monitor="val_top1", mode="max", save_top_k=1, save_last=True,
                                 every_n_epochs=1, auto_insert_metric_name=False)
    all_callbacks: list[L.Callback] = [checkpoint, RNGState(), Throughput(), *callbacks]
    if t.progress_bar:
        all_callbacks.append(TQDMProgressBar(leave=True))  # one bar kept per epoch
    return L.Trainer(
        default_root_dir=run_dir, max_epochs=t.max_epochs, accelerator=t.accelerator,
        devices=t.devices, num_nodes=t.num_nodes, strategy=t.strategy, precision=t.precision,
        deterministic=t.deterministic, log_every_n_steps=t.log_every_n_steps,
        limit_train_batches=t.limit_train_batches, limit_val_batches=t.limit_val_batches,
        enable_progress_bar=t.progress_bar, enable_model_summary=False,
        # The sanity check would draw random numbers a resumed run must not draw.
        num_sanity_val_steps=0,
        callbacks=all_callbacks, plugins=[SafeCheckpointIO()],
        logger=[CSVLogger(run_dir, name="", version=_csv_version(run_dir, bool(cfg.resume))),
                TensorBoardLogger(run_dir, name="", version="tensorboard")] if loggers else False,
    )


def train(cfg: RunConfig, callbacks: Sequence[L.Callback] = ()) -> RunResult:
    """Train ``cfg.model`` as ``cfg`` says; checkpoints, logs and plot go to the run folder.

    Bad input (data, model name, resume path) raises before any training step.
    """
    quiet_lightning()
    sets = build_datasets(cfg.data)
    check_model_name(cfg.model)
    run_dir = Path(cfg.out_dir) / (cfg.name or f"{cfg.model}-s{cfg.seed}")
    resume = _resume_path(cfg, run_dir)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    model = build_model(cfg.model, sets.num_classes, sets.in_chans, **cfg.model_args)
    params, macs = _model_cost(model, sets)
    module = Classifier(model, sets.num_classes, cfg.optim, cfg.trainer.max_epochs,
                        channels_last=cfg.trainer.channels_last, compile=cfg.trainer.compile,
                        meta=_meta(cfg, sets))
    throughput = Throughput()
    trainer = make_trainer(cfg, run_dir, [throughput, *callbacks])
    trainer.fit(module, datamodule=ClassificationData(cfg.data, sets), ckpt_path=resume)
    m = trainer.callback_metrics
    plot = None
    if trainer.is_global_zero:
        csv_paths = sorted(run_dir.glob("logs*/metrics.csv"))
        if csv_paths:
            plot = plot_training_curves(csv_paths, run_dir / "curves.png", title=cfg.model)
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    return RunResult(cfg.model, cfg.seed, 100 * float(m.get("val_top1", float("nan"))),
                     100 * float(m.get("val_top5", float("nan"))),
                     float(m.get("val_loss", float("nan"))), params, macs,
                     float(m.get("train_img_per_s", float("nan"))), run_dir,
                     Path(best) if best else None, plot)


@dataclass
class Trained:
    """A network restored from an ``attnconv train`` checkpoint, with its run's settings."""
    model: torch.nn.Module
    config: RunConfig
    meta: dict[str, Any]

    @property
    def input_size(self) -> tuple[int, int, int]:
        return (self.meta["in_chans"], self.meta["image_size"], self.meta["image_size"])


def is_trained_checkpoint(state: Any) -> bool:
    return isinstance(state, dict) and "attnconv" in state and "state_dict" in state


def load_trained(checkpoint: str | Path, state: dict[str, Any] | None = None) -> Trained:
    """Rebuild the network of an ``attnconv train`` checkpoint (read weights-only, unless its
    already loaded ``state`` is given)."""
    state = safe_load(checkpoint) if state is None else state
    if not is_trained_checkpoint(state):
        raise ValueError(f"{checkpoint} is not a checkpoint written by `attnconv train`")
    meta = state["attnconv"]
    cfg = apply(RunConfig(), meta["config"], where=str(checkpoint))
    model = build_model(cfg.model, meta["num_classes"], meta["in_chans"], **cfg.model_args)
    # Classifier keeps the network as `model`: its state-dict keys are `model.<name>`.
    model.load_state_dict({k.removeprefix("model."): v for k, v in state["state_dict"].items()
                           if k.startswith("model.")})
    return Trained(model, cfg, meta)


def load_model(name: str, checkpoint: str | Path | None = None, **kwargs: Any
               ) -> tuple[torch.nn.Module, tuple[int, int, int] | None]:
    """The zoo network ``name`` with the weights of ``checkpoint``, and its input size when the
    checkpoint says it.

    ``checkpoint`` may be an ``attnconv train`` checkpoint (its run's model and head are
    rebuilt; ``name`` must match) or a plain state dict (``{'state_dict': ...}`` accepted),
    loaded strictly into ``create_model(name, **kwargs)``. Files are read weights-only.
    """
    if checkpoint is None:
        return build_model(name, **kwargs), None
    state = safe_load(checkpoint)
    if is_trained_checkpoint(state):
        trained = load_trained(checkpoint, state)
        if trained.config.model != name:
            raise ValueError(f"{checkpoint} holds a {trained.config.model!r}, not {name!r}")
        return trained.model, trained.input_size
    model = build_model(name, **kwargs)
    model.load_state_dict(read_state_dict(state))
    return model, None


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
    trainer = L.Trainer(accelerator=accelerator, devices=1, logger=False,
                        enable_model_summary=False, enable_progress_bar=False,
                        enable_checkpointing=False)
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


COMPARE_HEADERS = ("model", "top-1 (%) mean ± std", "Δ top-1 vs first [95% CI]", "top-5 (%)",
                   "params (M)", "MACs (M)", "train img/s", "seeds")


def compare(models: Sequence[str], seeds: int, cfg: RunConfig) -> Comparison:
    """Train every model with seeds ``cfg.seed .. cfg.seed + seeds - 1`` under ``cfg``.

    The difference to the first model comes with a Welch t 95% interval over the seeds.
    """
    for name in models:  # every name is checked before the first model trains
        check_model_name(name)
    build_datasets(cfg.data)
    folder = Path(cfg.out_dir) / (cfg.name or "compare")
    results: dict[str, list[RunResult]] = {}
    for name in models:
        for seed in range(cfg.seed, cfg.seed + seeds):
            run = dataclasses.replace(cfg, model=name, seed=seed, out_dir=str(folder),
                                      name=f"{name}-s{seed}", resume=None)
            results.setdefault(name, []).append(train(run))
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
                     runs[0].macs / 1e6, statistics.fmean(r.img_per_s for r in runs), len(runs)))
    return markdown_table(COMPARE_HEADERS, rows)


def summary_table(results: Sequence[RunResult]) -> str:
    """SUMMARY_HEADERS rows for finished runs."""
    return markdown_table(SUMMARY_HEADERS, [r.row() for r in results])
