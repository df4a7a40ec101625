"""Semantic segmentation: torchvision's DeepLabV3 / FCN over the zoo's ResNets
(:mod:`attnconv.models.segmentation`), VOC / SBD / folder / generated data, torchmetrics mean
IoU, pixel accuracy and per-class IoU, and Lightning training (``attnconv train-seg``)."""

from attnconv.segmentation.config import SegConfig, load_recipe
from attnconv.segmentation.data import (
    IGNORE_INDEX,
    VOC_CLASSES,
    MaskFolder,
    build_segmentation_sets,
    shapes_segmentation,
)
from attnconv.segmentation.metrics import SegmentationMetrics, iou_table
from attnconv.segmentation.module import Segmenter
from attnconv.segmentation.run import SegResult, eval_seg, load_segmenter, train_seg

__all__ = ["IGNORE_INDEX", "VOC_CLASSES", "MaskFolder", "SegConfig", "SegResult",
           "SegmentationMetrics", "Segmenter", "build_segmentation_sets", "eval_seg",
           "iou_table", "load_recipe", "load_segmenter", "shapes_segmentation", "train_seg"]
