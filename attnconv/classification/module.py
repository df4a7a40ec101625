"""Image classification as a LightningModule: cross-entropy, SGD/AdamW, epoch lr schedules,
torchmetrics top-1/top-5."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from attnconv.classification.config import OptimConfig
from attnconv.engine import schedule
from attnconv.engine.trainer import stop_if_not_finite

__all__ = ["Classifier", "lr_factor"]


def lr_factor(epoch: int, optim: OptimConfig, max_epochs: int) -> float:
    """Multiplier of ``optim.lr`` during ``epoch`` (0-based): the engine's schedule
    (:func:`attnconv.engine.schedule.lr_factor`), stepped once per epoch."""
    return schedule.lr_factor(epoch, scheduler=optim.scheduler, milestones=optim.milestones,
                              gamma=optim.gamma, max_epochs=max_epochs,
                              warmup_epochs=optim.warmup_epochs)


class Classifier(L.LightningModule):
    """Trains ``model`` on (image, label) batches and logs loss, top-1 and top-5 accuracy."""

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        optim: OptimConfig,
        max_epochs: int,
        *,
        channels_last: bool = False,
        compile: bool = False,
        meta: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.optim = optim
        self.max_epochs = max_epochs
        self.channels_last = channels_last
        self.meta = meta or {}
        self.criterion = nn.CrossEntropyLoss(label_smoothing=optim.label_smoothing)
        top5 = min(5, num_classes)
        self.train_top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_top5 = MulticlassAccuracy(num_classes, top_k=top5, average="micro")
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        # Kept out of the module tree so that state-dict names stay those of the plain model.
        object.__setattr__(self, "_compiled", torch.compile(self.model) if compile else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        # `is None`, not `or`: truth-testing a compiled module asks the network for len().
        return (self.model if self._compiled is None else self._compiled)(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = self.criterion(logits, y)
        stop_if_not_finite(self, loss)
        self.train_top1(logits, y)
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        self.log("train_top1", self.train_top1, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_top1(logits, y)
        self.val_top5(logits, y)
        self.log("val_loss", self.criterion(logits, y), on_epoch=True, prog_bar=True,
                 sync_dist=True)
        self.log("val_top1", self.val_top1, on_epoch=True, prog_bar=True)
        self.log("val_top5", self.val_top5, on_epoch=True)

    def configure_optimizers(self) -> dict[str, Any]:
        o = self.optim
        if o.name == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(
                self.model.parameters(), lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                weight_decay=o.weight_decay)
        elif o.name == "adamw":
            opt = torch.optim.AdamW(self.model.parameters(), lr=o.lr, weight_decay=o.weight_decay)
        else:
            raise ValueError(f"unknown optim.name '{o.name}' (known: sgd, adamw)")
        lr_factor(0, o, self.max_epochs)  # an unknown scheduler fails here, not mid-run
        # A LambdaLR over a pure function: its state is the epoch count alone, which
        # torch.load(weights_only=True) reads back (MultiStepLR's Counter it would refuse).
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda epoch: lr_factor(epoch, o, self.max_epochs))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # What `attnconv eval` needs to rebuild the model and its data without other input.
        checkpoint["attnconv"] = self.meta
