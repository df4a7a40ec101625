"""Object detection as a LightningModule: torchvision detector losses, SGD with linear warm-up
and step decay (Detectron's 1x schedule), COCO evaluation of every validation epoch."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from pycocotools.coco import COCO
from torch import nn

from attnconv.detection.coco_eval import COCO_METRICS, coco_box_metrics, to_coco_detections
from attnconv.detection.config import DetOptimConfig
from attnconv.engine import schedule
from attnconv.engine.trainer import stop_if_not_finite

#: The optimizer section of :class:`attnconv.detection.config.DetectionConfig`.
DetOptim = DetOptimConfig


def lr_factor(step: int, steps_per_epoch: int, optim: DetOptimConfig) -> float:
    """Multiplier of ``optim.lr`` at optimizer step ``step`` (0-based): the engine's schedule
    (:func:`attnconv.engine.schedule.lr_factor`) stepped per iteration, with Detectron's
    linear warm-up over ``warmup_iters`` from ``warmup_factor`` and x ``gamma`` after each
    milestone epoch."""
    return schedule.lr_factor(step / steps_per_epoch, scheduler="multistep",
                              milestones=optim.milestones, gamma=optim.gamma,
                              warmup_epochs=optim.warmup_iters / steps_per_epoch,
                              warmup_start=optim.warmup_factor)


def optimizer_steps_per_epoch(trainer: L.Trainer) -> int:
    """Optimizer steps in one training epoch on each device: what the milestones (in epochs)
    are converted with. It depends on the data only, not on ``max_epochs`` or ``max_steps``,
    which a resumed run may change."""
    _ = trainer.estimated_stepping_batches  # sets up the training data: its length is known
    batches = trainer.num_training_batches
    if not math.isfinite(batches):
        raise ValueError("detection needs training data of known length (a map-style dataset)")
    return max(1, math.ceil(int(batches) / trainer.accumulate_grad_batches))


class Detector(L.LightningModule):
    """Trains a torchvision detector on (images, targets) list batches; every validation epoch
    runs pycocotools on ``coco_gt`` and logs ``val/AP`` ... ``val/APl`` (percent)."""

    def __init__(self, model: nn.Module, optim: DetOptimConfig, coco_gt: COCO | None = None,
                 meta: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.model = model
        self.optim = optim
        self.meta = meta or {}
        self.coco_gt = coco_gt
        self.metrics: dict[str, float] = {}
        self._detections: list[dict] = []

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        return self.model(images)

    def training_step(self, batch: tuple[list, list], batch_idx: int) -> torch.Tensor:
        images, targets = batch
        targets = [{"boxes": t["boxes"].as_subclass(torch.Tensor), "labels": t["labels"]}
                   for t in targets]
        losses = self.model(images, targets)
        loss = sum(losses.values())
        parts = ", ".join(f"{k} {v.item():.4g}" for k, v in losses.items())
        stop_if_not_finite(self, loss, f" ({parts})")
        batch_size = len(images)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, batch_size=batch_size)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._detections = []

    def validation_step(self, batch: tuple[list, list], batch_idx: int) -> None:
        images, targets = batch
        outputs = self.model(images)
        self._detections += to_coco_detections((int(t["image_id"]) for t in targets), outputs)

    def on_validation_epoch_end(self) -> None:
        detections = self._detections
        if dist.is_available() and dist.is_initialized():
            gathered: list[list[dict]] = [[] for _ in range(dist.get_world_size())]
            dist.all_gather_object(gathered, detections)
            detections = [d for part in gathered for d in part]
        if self.coco_gt is None or self.trainer.sanity_checking:
            return
        self.metrics = coco_box_metrics(self.coco_gt, detections)
        self.log_dict({f"val/{k}": self.metrics[k] for k in COCO_METRICS}, sync_dist=False)

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=self.optim.lr, momentum=self.optim.momentum,
                                    weight_decay=self.optim.weight_decay)
        steps_per_epoch = optimizer_steps_per_epoch(self.trainer)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, steps_per_epoch, self.optim))
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # What `attnconv eval-det` needs to rebuild the detector without other input.
        checkpoint["attnconv"] = self.meta
