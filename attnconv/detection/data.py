"""COCO-format detection data through torchvision: ``CocoDetection`` wrapped for transforms v2.

Resizing is left to the detector (Faster R-CNN's ``min_size`` / ``max_size``), so the
transforms only flip, convert and drop degenerate boxes, and predictions come back in the
original image coordinates that COCO evaluation expects.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.datasets import CocoDetection, wrap_dataset_for_transforms_v2
from torchvision.transforms import v2

Target = dict[str, Any]


def detection_transforms(train: bool) -> v2.Compose:
    steps: list[v2.Transform] = [v2.ToImage()]
    if train:
        steps.append(v2.RandomHorizontalFlip(0.5))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.SanitizeBoundingBoxes()]
    return v2.Compose(steps)


def coco_dataset(images: str | Path, annotations: str | Path, train: bool) -> Dataset:
    """(image, target) pairs with ``boxes`` (XYXY), ``labels`` (COCO category ids) and
    ``image_id``; ``dataset.coco`` is the pycocotools index used for evaluation."""
    base = CocoDetection(str(images), str(annotations),
                         transforms=_CompleteTarget(detection_transforms(train)))
    return wrap_dataset_for_transforms_v2(base, target_keys=("boxes", "labels", "image_id"))


class _CompleteTarget:
    """Transforms that also give images without annotations empty ``boxes`` / ``labels``
    (torchvision's wrapper returns only ``image_id`` for them)."""

    def __init__(self, transforms: v2.Compose) -> None:
        self.transforms = transforms

    def __call__(self, image: Any, target: Target) -> tuple[torch.Tensor, Target]:
        if "boxes" not in target:
            height, width = v2.functional.get_size(image)
            target = {**target,
                      "boxes": tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY",
                                                        canvas_size=(height, width)),
                      "labels": torch.zeros(0, dtype=torch.int64)}
        return self.transforms(image, target)


def collate(batch: list[tuple[torch.Tensor, Target]]) -> tuple[list[torch.Tensor], list[Target]]:
    """Detection batches are lists: images differ in size and in their number of boxes."""
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)


def detection_loader(dataset: Dataset, batch_size: int, train: bool, num_workers: int = 0,
                     seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=train, drop_last=False,
                      num_workers=num_workers, collate_fn=collate, generator=generator,
                      persistent_workers=num_workers > 0)
