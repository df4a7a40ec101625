"""``train_seg`` and ``eval_seg``: the library functions behind ``attnconv train-seg`` and
``attnconv eval-seg``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from attnconv.models.segmentation import create_segmentation_model
from attnconv.profiling import count_params
from attnconv.segmentation.config import SegConfig, apply
from attnconv.segmentation.data import SegmentationSets, build_segmentation_sets, pad_collate
from attnconv.segmentation.metrics import iou_table
from attnconv.segmentation.module import Segmenter
from attnconv.training.callbacks import RNGState
from attnconv.training.checkpoint import SafeCheckpointIO
from attnconv.training.models import check_model_name
from attnconv.training.run import quiet_lightning
from attnconv.weights import safe_load


@dataclass
class SegResult:
    """Validation metrics of a run or a checkpoint (fractions in [0, 1])."""

    model: str
    head: str
    miou: float
    pixel_acc: float
    iou: dict[str, float]
    params: int
    run_dir: Path | None = None
    best_checkpoint: Path | None = None

    def report(self) -> str:
        head = (f"{self.head}_{self.model}: mean IoU {100 * self.miou:.2f}%  pixel accuracy "
                f"{100 * self.pixel_acc:.2f}%  ({self.params / 1e6:.2f}M parameters)")
        return head + "\n\n" + iou_table(list(self.iou.values()), list(self.iou))

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "head": self.head, "miou": self.miou,
                "pixel_acc": self.pixel_acc, "iou": self.iou, "params": self.params}


def build_sets(cfg: SegConfig, run_dir: Path) -> SegmentationSets:
    d = cfg.data
    root = d.root if d.root is not None or d.name != "shapes" else str(run_dir / "shapes")
    return build_segmentation_sets(
        d.name, root, crop_size=d.crop_size, base_size=d.base_size, eval_size=d.eval_size,
        sbd_root=d.sbd_root,
        num_classes=d.num_classes,
        shapes=dict(num_train=d.num_train, num_val=d.num_val, image_size=d.image_size,
                    seed=cfg.seed))


def build_model(cfg: SegConfig, num_classes: int, pretrained: bool = True) -> torch.nn.Module:
    args = dict(cfg.model_args)
    if not pretrained:
        args.pop("pretrained_backbone", None)
    return create_segmentation_model(cfg.head, cfg.model, num_classes, **args)


def loaders(cfg: SegConfig, sets: SegmentationSets) -> tuple[DataLoader, DataLoader]:
    d = cfg.data
    common = dict(num_workers=d.num_workers, collate_fn=pad_collate,
                  persistent_workers=d.num_workers > 0)
    return (DataLoader(sets.train, d.batch_size, shuffle=True, drop_last=len(sets.train) >
                       d.batch_size, **common),
            DataLoader(sets.val, d.batch_size, shuffle=False, **common))


def _trainer(cfg: SegConfig, run_dir: Path, resuming: bool) -> L.Trainer:
    t = cfg.trainer
    callbacks: list[L.Callback] = [
        ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best", monitor="val_miou",
                        mode="max", save_top_k=1, save_last=True, every_n_epochs=1,
                        auto_insert_metric_name=False),
        RNGState()]
    if t.progress_bar:
        callbacks.append(TQDMProgressBar(leave=True))
    version = "logs" if not resuming else f"logs-{len(list(run_dir.glob('logs*')))}"
    return L.Trainer(
        default_root_dir=run_dir, max_epochs=t.max_epochs, accelerator=t.accelerator,
        devices=t.devices, num_nodes=t.num_nodes, strategy=t.strategy, precision=t.precision,
        deterministic=t.deterministic, log_every_n_steps=t.log_every_n_steps,
        limit_train_batches=t.limit_train_batches, limit_val_batches=t.limit_val_batches,
        enable_progress_bar=t.progress_bar, enable_model_summary=False,
        num_sanity_val_steps=0, callbacks=callbacks, plugins=[SafeCheckpointIO()],
        logger=[CSVLogger(run_dir, name="", version=version)])


def train_seg(cfg: SegConfig) -> SegResult:
    """Train ``cfg.head`` over ``cfg.model`` as ``cfg`` says; checkpoints, logs and the
    metrics (``seg_metrics.json``, ``seg_metrics.md``) go to the run folder.

    Bad input (data, model name, options of the model, resume path) raises before training.
    """
    quiet_lightning()
    check_model_name(cfg.model)
    run_dir = Path(cfg.out_dir) / cfg.run_name()
    resume = None
    if cfg.resume:
        resume = run_dir / "checkpoints" / "last.ckpt" if cfg.resume == "last" \
            else Path(cfg.resume)
        if not resume.is_file():
            raise FileNotFoundError(f"resume checkpoint {resume} does not exist")
    sets = build_sets(cfg, run_dir)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    model = build_model(cfg, sets.num_classes)
    meta = {"config": cfg.to_dict(), "class_names": list(sets.class_names)}
    module = Segmenter(model, sets.num_classes, cfg.optim, meta=meta)
    trainer = _trainer(cfg, run_dir, resume is not None)
    train_loader, val_loader = loaders(cfg, sets)
    trainer.fit(module, train_loader, val_loader, ckpt_path=resume)
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    result = _result(cfg, module, trainer.callback_metrics, sets.class_names)
    result.run_dir, result.best_checkpoint = run_dir, Path(best) if best else None
    if trainer.is_global_zero:
        _write_report(result, run_dir)
    return result


def _result(cfg: SegConfig, module: Segmenter, metrics: dict[str, Any],
            class_names: tuple[str, ...] | list[str]) -> SegResult:
    iou = module.last_iou if module.last_iou is not None else torch.full(
        (len(class_names),), float("nan"))
    return SegResult(cfg.model, cfg.head, float(metrics.get("val_miou", float("nan"))),
                     float(metrics.get("val_pixel_acc", float("nan"))),
                     {name: float(v) for name, v in zip(class_names, iou, strict=True)},
                     count_params(module.model))


def _write_report(result: SegResult, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "seg_metrics.json").write_text(json.dumps(result.to_dict(), indent=1))
    (folder / "seg_metrics.md").write_text(result.report() + "\n")


def load_segmenter(checkpoint: str | Path) -> tuple[torch.nn.Module, SegConfig, dict[str, Any]]:
    """The network of an ``attnconv train-seg`` checkpoint (read weights-only), its config and
    its metadata."""
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    state = safe_load(path)
    if not (isinstance(state, dict) and "state_dict" in state
            and "class_names" in state.get("attnconv", {})):
        raise ValueError(f"{path} is not a checkpoint written by `attnconv train-seg`")
    meta = state["attnconv"]
    cfg = apply(SegConfig(), meta["config"], where=str(path))
    model = build_model(cfg, len(meta["class_names"]), pretrained=False)
    model.load_state_dict({k.removeprefix("model."): v for k, v in state["state_dict"].items()
                           if k.startswith("model.")})
    return model, cfg, meta


def eval_seg(checkpoint: str | Path, data_overrides: dict[str, Any] | None = None,
             accelerator: str = "auto") -> SegResult:
    """Mean IoU, pixel accuracy and per-class IoU of a ``train-seg`` checkpoint on its
    validation set; ``data_overrides`` (``{'root': ...}``) change the stored data section."""
    quiet_lightning()
    model, cfg, meta = load_segmenter(checkpoint)
    if data_overrides:
        cfg = apply(cfg, {"data": data_overrides}, where="data overrides")
    run_dir = Path(checkpoint).resolve().parent.parent
    sets = build_sets(cfg, run_dir)
    if list(sets.class_names) != list(meta["class_names"]):
        raise ValueError(f"{checkpoint} was trained on classes {meta['class_names']}, the data "
                         f"has {list(sets.class_names)}")
    module = Segmenter(model, sets.num_classes, cfg.optim, meta=meta)
    trainer = L.Trainer(accelerator=accelerator, devices=1, logger=False,
                        enable_model_summary=False, enable_progress_bar=False,
                        enable_checkpointing=False)
    (metrics,) = trainer.validate(module, loaders(cfg, sets)[1], verbose=False)
    return _result(cfg, module, metrics, sets.class_names)


__all__ = ["SegResult", "eval_seg", "load_segmenter", "train_seg"]
