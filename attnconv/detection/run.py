"""``train`` and ``evaluate`` of detection: the library functions behind ``attnconv train-det``
/ ``attnconv eval-det``.

Without data paths the run generates the synthetic shapes dataset into its own folder, so a
fresh clone trains end to end on CPU with no download. Every evaluation prints AP, AP50, AP75,
APs, APm, APl and writes them to ``RUN/coco_metrics.{json,csv}``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torchvision.ops.misc import FrozenBatchNorm2d

from attnconv.analysis.profiling import model_table
from attnconv.detection.coco_eval import metrics_table, write_metrics
from attnconv.detection.config import DetectionConfig
from attnconv.detection.data import coco_dataset, detection_loader
from attnconv.detection.module import Detector
from attnconv.detection.synthetic import make_shapes_dataset
from attnconv.engine.config import ConfigError, apply
from attnconv.engine.run import Fitted, Task, fit
from attnconv.engine.trainer import (
    SavedEpoch,
    evaluation_trainer,
    is_global_zero,
    quiet_lightning,
    result_note,
)
from attnconv.errors import CheckpointError
from attnconv.models.detection import fasterrcnn
from attnconv.weights import atomic_save, safe_load

__all__ = ["DetectionResult", "build_detector", "evaluate", "train"]


def _datasets(config: DetectionConfig, run_dir: Path):
    data = config.data
    if data.train_images is None:
        shapes = make_shapes_dataset(run_dir / "data", data.synthetic_train, data.synthetic_val,
                                     data.synthetic_size, seed=config.seed)
        paths = (shapes.train.images, shapes.train.annotations, shapes.val.images,
                 shapes.val.annotations)
    else:
        paths = (data.train_images, data.train_annotations, data.val_images,
                 data.val_annotations)
    train = coco_dataset(paths[0], paths[1], train=True)
    val = coco_dataset(paths[2], paths[3], train=False)
    num_classes = data.num_classes or max(train.coco.getCatIds()) + 1
    return train, val, num_classes


def build_detector(config: DetectionConfig, num_classes: int, load_init: bool = True
                   ) -> torch.nn.Module:
    """The Faster R-CNN ``config`` describes (``config.model`` is the backbone's zoo name), its
    backbone started from ``config.init``; without ``load_init`` the same network (frozen BN)
    without reading those weights, for a checkpoint to fill. ConfigError for a config that
    cannot describe one (:meth:`DetectionConfig.check`)."""
    config.check()
    return _detector(config, num_classes, load_init)


def _detector(config: DetectionConfig, num_classes: int, load_init: bool) -> torch.nn.Module:
    args = dict(config.model_args)
    if config.init and load_init:
        args["pretrained_backbone"] = config.init
    elif config.init:
        args.setdefault("norm_layer", FrozenBatchNorm2d)
    model = fasterrcnn(config.model, num_classes, **args)
    if config.init and load_init:
        print(f"backbone {model.backbone.load_report}")
    return model


def detector_summary(name: str, model: torch.nn.Module) -> str:
    """The table printed before training (:func:`attnconv.analysis.profiling.model_table`), for a
    square image at the side Faster R-CNN resizes it to (``min(min_size, max_size)``)."""
    side = min(max(model.transform.min_size), model.transform.max_size)
    return model_table([(f"fasterrcnn({name})", model)], [torch.zeros(3, side, side)],
                       input_label=f"3x{side}x{side} image")


@dataclass
class DetectionResult:
    model: str
    metrics: dict[str, float]
    run_dir: Path
    checkpoint: Path
    seconds: float
    #: Which epoch and file the metrics are from (and the best epoch's, when another).
    note: str = ""


class Detection(Task[DetectionConfig, DetectionResult]):
    """Detection's hooks of the run template. Without data paths the data is generated into
    the run folder."""

    monitor = "val/AP"
    tensorboard = False

    def data(self, run_dir: Path) -> tuple[Any, Any, int]:
        return _datasets(self.config, run_dir)

    def module(self, data: tuple[Any, Any, int], load_init: bool) -> tuple[Detector, str]:
        cfg = self.config
        _, val, num_classes = data
        model = _detector(cfg, num_classes, load_init)
        meta = {"config": cfg.to_dict(), "num_classes": num_classes}
        return (Detector(model, cfg.optim, coco_gt=val.coco, meta=meta),
                detector_summary(cfg.model, model))

    def loaders(self, data: tuple[Any, Any, int]) -> dict[str, Any]:
        d = self.config.data
        train, val, _ = data
        # The shuffle draws from the global generator, whose state the checkpoints keep
        # (RNGState), so that a resumed run sees the data in the same order.
        return {"train_dataloaders": detection_loader(train, d.batch_size, True, d.num_workers),
                "val_dataloaders": detection_loader(val, d.batch_size, False, d.num_workers)}

    def finish(self, fitted: Fitted) -> DetectionResult:
        cfg, module, run_dir = self.config, fitted.module, fitted.run_dir
        # The last validation may have been skipped (max_steps, check_val_every_n_epoch).
        evaluation_trainer(cfg.trainer.accelerator).validate(
            module, self.loaders(fitted.data)["val_dataloaders"], verbose=False)
        checkpoint = run_dir / "detector.pt"
        last = fitted.last
        if fitted.trainer.is_global_zero:
            epoch = {"epoch": last.epoch} if last is not None else {}
            atomic_save({**module.meta, **epoch, "state_dict": module.model.state_dict()},
                        checkpoint)
        if last is not None:  # detector.pt holds the weights of last.ckpt
            last = SavedEpoch(checkpoint, last.epoch, module.metrics.get("AP"))
        return _report(cfg.model, module.metrics, run_dir, checkpoint, fitted.seconds,
                       result_note(last, fitted.best, cfg.trainer.max_epochs, "AP"))


def train(config: DetectionConfig, callbacks: Sequence[L.Callback] = ()) -> DetectionResult:
    """Train Faster R-CNN as ``config`` says, evaluate on the val split with pycocotools, print
    the table and write ``RUN/detector.pt`` (weights + config), ``RUN/coco_metrics.*`` and
    the Lightning checkpoints ``RUN/checkpoints/{best,last}.ckpt`` (for ``resume``)."""
    return fit(Detection(config), callbacks)


def _report(model: str, metrics: dict[str, float], run_dir: Path, checkpoint: Path,
            seconds: float, note: str) -> DetectionResult:
    json_path, csv_path = write_metrics(run_dir, metrics, model)
    if is_global_zero():  # every process of a distributed run gets here; one reports
        print(f"\nCOCO box metrics (percent), {run_dir}\n")
        print(metrics_table({model: metrics}))
        print(f"\n{note}\nwritten: {json_path}, {csv_path}")
    return DetectionResult(model, metrics, run_dir, checkpoint, seconds, note)


def evaluate(checkpoint: str | Path, val_images: str | None = None,
             val_annotations: str | None = None, run_dir: str | Path | None = None,
             batch_size: int | None = None, accelerator: str | None = None
             ) -> DetectionResult:
    """Evaluate ``RUN/detector.pt`` (or a train-det ``.ckpt``) on a COCO split (default: the
    split it was validated on). Writes ``coco_metrics.*`` only; the training log is untouched."""
    quiet_lightning()
    checkpoint = Path(checkpoint)
    saved = safe_load(checkpoint)
    if isinstance(saved, dict) and "attnconv" in saved:  # a Lightning checkpoint of train-det
        saved = {**saved["attnconv"], "epoch": saved.get("epoch"), "state_dict": {
            k.removeprefix("model."): v for k, v in saved["state_dict"].items()}}
    if not (isinstance(saved, dict) and {"config", "num_classes", "state_dict"} <= set(saved)):
        raise CheckpointError(f"{checkpoint} is not a checkpoint written by `attnconv train-det`")
    if "in_chans" in saved:  # what `attnconv train` stores with a classifier
        raise CheckpointError(f"{checkpoint} is a classification checkpoint of `attnconv train`, "
                              "not of `attnconv train-det`: use attnconv eval --checkpoint")
    config = apply(DetectionConfig(), saved["config"], where=str(checkpoint))
    home = checkpoint.parent if checkpoint.suffix == ".pt" else checkpoint.parent.parent
    run_dir = Path(run_dir) if run_dir else home
    if val_images is None:
        if config.data.val_images is None:  # the synthetic split generated inside the run
            val_images, val_annotations = (home / "data" / "val",
                                           home / "data" / "annotations" / "instances_val.json")
        else:
            val_images, val_annotations = config.data.val_images, config.data.val_annotations
    if val_annotations is None:
        raise ConfigError("--val-annotations is required with --val-images")
    val = coco_dataset(val_images, val_annotations, train=False)
    # The weights come from the file: no ImageNet backbone to load again, but the same
    # (frozen) BN layers as in training.
    model = build_detector(config, saved["num_classes"], load_init=False)
    model.load_state_dict(saved["state_dict"])
    module = Detector(model, config.optim, coco_gt=val.coco)
    trainer = evaluation_trainer(accelerator or config.trainer.accelerator)
    start = time.perf_counter()
    trainer.validate(module, detection_loader(val, batch_size or config.data.batch_size, False),
                     verbose=False)
    epoch = saved.get("epoch")
    note = f"figures of {checkpoint}" + (
        f" (epoch {epoch + 1}/{config.trainer.max_epochs})" if isinstance(epoch, int) else "")
    return _report(config.model, module.metrics, run_dir, checkpoint,
                   time.perf_counter() - start, note)
