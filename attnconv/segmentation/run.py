"""``train`` and ``evaluate`` of segmentation: the library functions behind ``attnconv
train-seg`` and ``attnconv eval-seg``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from attnconv.analysis.profiling import count_params
from attnconv.engine.config import apply
from attnconv.engine.run import Fitted, Task, fit
from attnconv.engine.trainer import evaluation_trainer, quiet_lightning, result_note
from attnconv.errors import CheckpointError
from attnconv.models.segmentation import create_segmentation_model
from attnconv.segmentation.config import SegmentationConfig
from attnconv.segmentation.data import SegmentationSets, build_segmentation_sets, pad_collate
from attnconv.segmentation.metrics import iou_table
from attnconv.segmentation.module import Segmenter
from attnconv.weights import safe_load


@dataclass
class SegmentationResult:
    """Validation metrics of a run or a checkpoint (fractions in [0, 1])."""

    model: str
    head: str
    miou: float
    pixel_acc: float
    iou: dict[str, float]
    params: int
    run_dir: Path | None = None
    best_checkpoint: Path | None = None
    #: Which epoch and file the figures are from (:func:`attnconv.engine.trainer.result_note`).
    note: str = ""

    def report(self) -> str:
        head = (f"{self.head}_{self.model}: mean IoU {100 * self.miou:.2f}%  pixel accuracy "
                f"{100 * self.pixel_acc:.2f}%  ({self.params / 1e6:.2f}M parameters)")
        note = f"\n{self.note}" if self.note else ""
        return head + note + "\n\n" + iou_table(list(self.iou.values()), list(self.iou))

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "head": self.head, "miou": self.miou,
                "pixel_acc": self.pixel_acc, "iou": self.iou, "params": self.params}


def build_sets(cfg: SegmentationConfig, run_dir: Path) -> SegmentationSets:
    d = cfg.data
    root = d.root if d.root is not None or d.name != "shapes" else str(run_dir / "data")
    return build_segmentation_sets(
        d.name, root, crop_size=d.crop_size, base_size=d.base_size, eval_size=d.eval_size,
        sbd_root=d.sbd_root,
        num_classes=d.num_classes,
        shapes=dict(num_train=d.num_train, num_val=d.num_val, image_size=d.image_size,
                    seed=cfg.seed))


def build_model(cfg: SegmentationConfig, num_classes: int, load_init: bool = True
                ) -> torch.nn.Module:
    """The network ``cfg`` describes, its backbone started from ``cfg.init``; without
    ``load_init`` the same network without reading those weights, for a checkpoint to fill."""
    args = dict(cfg.model_args)
    if cfg.init and load_init:
        args["pretrained_backbone"] = cfg.init
    model = create_segmentation_model(cfg.head, cfg.model, num_classes, **args)
    if cfg.init and load_init:
        print(f"backbone {model.load_report}")
    return model


def loaders(cfg: SegmentationConfig, sets: SegmentationSets) -> tuple[DataLoader, DataLoader]:
    d = cfg.data
    common = dict(num_workers=d.num_workers, collate_fn=pad_collate,
                  persistent_workers=d.num_workers > 0)
    return (DataLoader(sets.train, d.batch_size, shuffle=True, drop_last=len(sets.train) >
                       d.batch_size, **common),
            DataLoader(sets.val, d.batch_size, shuffle=False, **common))


class Segmentation(Task[SegmentationConfig, SegmentationResult]):
    """Segmentation's hooks of the run template. The generated shapes go into the run folder
    unless ``data.root`` says where."""

    monitor = "val_miou"
    val_loss = "val_loss"
    tensorboard = False

    def data(self, run_dir: Path) -> SegmentationSets:
        return build_sets(self.config, run_dir)

    def module(self, sets: SegmentationSets, load_init: bool) -> tuple[Segmenter, str]:
        cfg = self.config
        model = build_model(cfg, sets.num_classes, load_init=load_init)
        meta = {"config": cfg.to_dict(), "class_names": list(sets.class_names)}
        return Segmenter(model, sets.num_classes, cfg.optim, meta=meta), ""

    def loaders(self, sets: SegmentationSets) -> dict[str, Any]:
        train, val = loaders(self.config, sets)
        return {"train_dataloaders": train, "val_dataloaders": val}

    def finish(self, fitted: Fitted) -> SegmentationResult:
        cfg, trainer, sets = self.config, fitted.trainer, fitted.data
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback \
            else ""
        result = _result(cfg, fitted.module, trainer.callback_metrics, sets.class_names)
        result.run_dir, result.best_checkpoint = fitted.run_dir, Path(best) if best else None
        result.note = result_note(fitted.last, fitted.best, cfg.trainer.max_epochs,
                                  "mean IoU (%)", scale=100)
        if trainer.is_global_zero:
            _write_report(result, fitted.run_dir)
        return result


def train(cfg: SegmentationConfig, callbacks: Sequence[L.Callback] = ()) -> SegmentationResult:
    """Train ``cfg.head`` over ``cfg.model`` as ``cfg`` says; checkpoints
    (``RUN/checkpoints/{best,last}.ckpt``, best by val mean IoU), logs and the metrics
    (``seg_metrics.json``, ``seg_metrics.md``) go to the run folder.

    Bad input (data, model name, options of the model, resume path) raises before training.
    """
    return fit(Segmentation(cfg), callbacks)


def _result(cfg: SegmentationConfig, module: Segmenter, metrics: dict[str, Any],
            class_names: tuple[str, ...] | list[str]) -> SegmentationResult:
    iou = module.last_iou if module.last_iou is not None else torch.full(
        (len(class_names),), float("nan"))
    return SegmentationResult(cfg.model, cfg.head, float(metrics.get("val_miou", float("nan"))),
                     float(metrics.get("val_pixel_acc", float("nan"))),
                     {name: float(v) for name, v in zip(class_names, iou, strict=True)},
                     count_params(module.model))


def _write_report(result: SegmentationResult, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "seg_metrics.json").write_text(json.dumps(result.to_dict(), indent=1))
    (folder / "seg_metrics.md").write_text(result.report() + "\n")


def load_segmenter(checkpoint: str | Path
                   ) -> tuple[torch.nn.Module, SegmentationConfig, dict[str, Any]]:
    """The network of an ``attnconv train-seg`` checkpoint (read weights-only), its config and
    its metadata (with ``epoch``: the epoch it ends, counting from 0)."""
    path = Path(checkpoint)
    state = safe_load(path)
    if not (isinstance(state, dict) and "state_dict" in state
            and "class_names" in (state.get("attnconv") or {})):
        raise CheckpointError(f"{path} is not a checkpoint written by `attnconv train-seg`")
    meta = {**state["attnconv"], "epoch": state.get("epoch")}
    cfg = apply(SegmentationConfig(), meta["config"], where=str(path))
    model = build_model(cfg, len(meta["class_names"]), load_init=False)
    model.load_state_dict({k.removeprefix("model."): v for k, v in state["state_dict"].items()
                           if k.startswith("model.")})
    return model, cfg, meta


def evaluate(checkpoint: str | Path, data_overrides: dict[str, Any] | None = None,
             accelerator: str = "auto") -> SegmentationResult:
    """Mean IoU, pixel accuracy and per-class IoU of a ``train-seg`` checkpoint on its
    validation set; ``data_overrides`` (``{'root': ...}``) change the stored data section."""
    quiet_lightning()
    model, cfg, meta = load_segmenter(checkpoint)
    if data_overrides:
        cfg = apply(cfg, {"data": data_overrides}, where="data overrides")
    run_dir = Path(checkpoint).resolve().parent.parent
    sets = build_sets(cfg, run_dir)
    if list(sets.class_names) != list(meta["class_names"]):
        raise CheckpointError(f"{checkpoint} was trained on classes {meta['class_names']}, "
                              f"the data has {list(sets.class_names)}")
    module = Segmenter(model, sets.num_classes, cfg.optim, meta=meta)
    trainer = evaluation_trainer(accelerator)
    (metrics,) = trainer.validate(module, loaders(cfg, sets)[1], verbose=False)
    result = _result(cfg, module, metrics, sets.class_names)
    epoch = meta.get("epoch")
    result.note = f"figures of {checkpoint}" + (
        f" (epoch {epoch + 1}/{cfg.trainer.max_epochs})" if isinstance(epoch, int) else "")
    return result


__all__ = ["SegmentationResult", "evaluate", "load_segmenter", "train"]
