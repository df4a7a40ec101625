"""Object detection: Faster R-CNN over attention ResNet-FPN backbones
(:mod:`attnconv.models.detection`), COCO-format data, pycocotools evaluation, Lightning
training over :mod:`attnconv.engine`, and a generated shapes dataset for runs without downloads.

Names are imported on first use, so that ``attnconv --help`` does not load Lightning.
"""

from __future__ import annotations

from attnconv._lazy import lazy_getattr

_HOMES = {
    "COCO_METRICS": "coco_eval", "coco_box_metrics": "coco_eval", "metrics_table": "coco_eval",
    "coco_dataset": "data", "collate": "data", "detection_loader": "data",
    "Detector": "module", "DetOptim": "module",
    "DetectionConfig": "config", "DetDataConfig": "config", "DetOptimConfig": "config",
    "DetectionResult": "run", "build_detector": "run", "evaluate": "run", "train": "run",
    "ShapesDataset": "synthetic", "make_shapes_dataset": "synthetic",
}

__all__ = sorted(_HOMES)

__getattr__ = lazy_getattr(__name__, _HOMES)
