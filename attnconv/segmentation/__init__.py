"""Semantic segmentation: torchvision's DeepLabV3 / FCN over the zoo's ResNets
(:mod:`attnconv.models.segmentation`), VOC / SBD / folder / generated data, torchmetrics mean
IoU, pixel accuracy and per-class IoU, and Lightning training (``attnconv train-seg``).

Names are imported on first use, so that ``attnconv --help`` does not load Lightning.
"""

from __future__ import annotations

from attnconv._lazy import lazy_getattr

_HOMES = {
    "SegmentationConfig": "config",
    "IGNORE_INDEX": "data", "VOC_CLASSES": "data", "MaskFolder": "data",
    "build_segmentation_sets": "data", "shapes_segmentation": "data",
    "SegmentationMetrics": "metrics", "iou_table": "metrics",
    "Segmenter": "module",
    "SegmentationResult": "run", "evaluate": "run", "load_segmenter": "run", "train": "run",
}

__all__ = sorted(_HOMES)

__getattr__ = lazy_getattr(__name__, _HOMES)
