"""Semantic segmentation: torchvision's DeepLabV3 / FCN over the zoo's ResNets
(:mod:`attnconv.models.segmentation`), VOC / SBD / folder / generated data, torchmetrics mean
IoU, pixel accuracy and per-class IoU, and Lightning training (``attnconv train-seg``).

Names are imported on first use, so that ``attnconv --help`` does not load Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "SegmentationConfig": "config",
    "IGNORE_INDEX": "data", "VOC_CLASSES": "data", "MaskFolder": "data",
    "build_segmentation_sets": "data", "shapes_segmentation": "data",
    "SegmentationMetrics": "metrics", "iou_table": "metrics",
    "Segmenter": "module",
    "SegmentationResult": "run", "evaluate": "run", "load_segmenter": "run", "train": "run",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'attnconv.segmentation' has no attribute '{name}'")
    return getattr(importlib.import_module(f"attnconv.segmentation.{_HOMES[name]}"), name)
