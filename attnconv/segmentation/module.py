"""Semantic segmentation as a LightningModule: per-pixel cross-entropy (255 ignored) on the main
head plus ``aux_weight`` x the auxiliary head's, SGD with DeepLab's "poly" schedule (Chen et al.,
arXiv:1606.00915), mean IoU / pixel accuracy / per-class IoU through torchmetrics."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from attnconv.engine.trainer import stop_if_not_finite
from attnconv.segmentation.config import SegOptimConfig
from attnconv.segmentation.data import IGNORE_INDEX
from attnconv.segmentation.metrics import SegmentationMetrics


def poly_factor(step: int, optim: SegOptimConfig, total_steps: int) -> float:
    """Multiplier of ``optim.lr`` at optimizer step ``step`` (0-based): linear warm-up, then
    (1 - step / total_steps) ** power."""
    if step < optim.warmup_iters:
        return (step + 1) / (optim.warmup_iters + 1)
    return max(0.0, 1 - step / max(1, total_steps)) ** optim.power


class Segmenter(L.LightningModule):
    """Trains a torchvision-style segmentation model (``model(x)`` -> ``{'out', 'aux'?}``)."""

    def __init__(self, model: nn.Module, num_classes: int, optim: SegOptimConfig, *,
                 meta: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.model = model
        self.num_classes = num_classes
        self.optim = optim
        self.meta = meta or {}
        self.val_metrics = SegmentationMetrics(num_classes)
        #: Per-class IoU of the last validation epoch (what eval-seg and the report print).
        self.last_iou: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model(x)

    def _loss(self, out: dict[str, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(out["out"], y, ignore_index=IGNORE_INDEX)
        if out.get("aux") is not None:
            loss = loss + self.optim.aux_weight * F.cross_entropy(out["aux"], y,
                                                                  ignore_index=IGNORE_INDEX)
        return loss

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        x, y = batch
        loss = self._loss(self(x), y)
        stop_if_not_finite(self, loss)
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True,
                 batch_size=len(x))
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> None:
        x, y = batch
        out = self(x)
        self.log("val_loss", F.cross_entropy(out["out"], y, ignore_index=IGNORE_INDEX),
                 on_epoch=True, prog_bar=True, sync_dist=True, batch_size=len(x))
        self.val_metrics.update(out["out"], y)

    def on_validation_epoch_end(self) -> None:
        metrics = self.val_metrics.compute()  # torchmetrics syncs the states across processes
        self.val_metrics.reset()
        self.last_iou = metrics["iou"].detach().cpu()
        self.log("val_miou", metrics["miou"], prog_bar=True)
        self.log("val_pixel_acc", metrics["pixel_acc"])

    def configure_optimizers(self) -> dict[str, Any]:
        o = self.optim
        # torchvision's segmentation reference: the auxiliary head learns at 10x the lr.
        aux = getattr(self.model, "aux_classifier", None)
        aux_ids = {id(p) for p in aux.parameters()} if aux is not None else set()
        groups = [{"params": [p for p in self.model.parameters()
                              if p.requires_grad and id(p) not in aux_ids]}]
        if aux_ids:
            groups.append({"params": list(aux.parameters()), "lr": o.lr * 10})
        opt = torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
        total = int(self.trainer.estimated_stepping_batches)
        # A LambdaLR over a pure function: its state is the step count alone, which a
        # weights-only checkpoint read restores.
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: poly_factor(step, o, total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # What `attnconv eval-seg` needs to rebuild the model and its data without other input.
        checkpoint["attnconv"] = self.meta


__all__ = ["Segmenter", "poly_factor"]
