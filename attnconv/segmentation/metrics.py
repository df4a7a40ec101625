"""Semantic-segmentation metrics through torchmetrics: per-class IoU (Jaccard index), mean IoU
and pixel accuracy over a whole dataset, pixels marked 255 ignored (the Pascal VOC protocol:
Everingham et al., IJCV 2010 -- IoU = TP / (TP + FP + FN) per class, accumulated over all
images before dividing)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from attnconv.engine.tables import markdown_table
from attnconv.segmentation.data import IGNORE_INDEX


class SegmentationMetrics(nn.Module):
    """Accumulates predictions (N, H, W) or logits (N, C, H, W) against masks (N, H, W).

    ``compute()`` gives ``miou`` (mean over the classes that occur in the targets or the
    predictions), ``pixel_acc`` and ``iou`` (one value per class, NaN for a class seen in
    neither).
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.num_classes = num_classes
        # zero_division NaN: a class absent from targets and predictions has no IoU, and must
        # not count as 0 in the mean.
        self.iou = MulticlassJaccardIndex(num_classes, average="none", ignore_index=ignore_index,
                                          zero_division=float("nan"))
        self.pixel_acc = MulticlassAccuracy(num_classes, average="micro",
                                            ignore_index=ignore_index)

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        if preds.dim() == target.dim() + 1:
            preds = preds.argmax(1)
        self.iou.update(preds, target)
        self.pixel_acc.update(preds, target)

    def compute(self) -> dict[str, torch.Tensor]:
        iou = self.iou.compute()
        return {"miou": iou.nanmean(), "pixel_acc": self.pixel_acc.compute(), "iou": iou}

    def reset(self) -> None:
        self.iou.reset()
        self.pixel_acc.reset()


def iou_table(iou: Sequence[float] | torch.Tensor, class_names: Sequence[str]) -> str:
    """Per-class IoU (%) as a markdown table."""
    values = [float(v) for v in torch.as_tensor(iou)]
    if len(values) != len(class_names):
        raise ValueError(f"{len(values)} IoU values for {len(class_names)} class names")
    return markdown_table(("class", "IoU (%)"),
                          [(name, 100 * v) for name, v in zip(class_names, values, strict=True)])


__all__ = ["SegmentationMetrics", "iou_table"]
