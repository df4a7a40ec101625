"""Object detection: Faster R-CNN over attention ResNet-FPN backbones
(:mod:`attnconv.models.detection`), COCO-format data, pycocotools evaluation, Lightning
training, and a generated shapes dataset for runs without downloads."""

from attnconv.detection.coco_eval import COCO_METRICS, coco_box_metrics, metrics_table
from attnconv.detection.data import coco_dataset, collate, detection_loader
from attnconv.detection.module import Detector, DetOptim
from attnconv.detection.run import DetConfig, DetResult, eval_det, load_det_recipe, train_det
from attnconv.detection.synthetic import ShapesDataset, make_shapes_dataset

__all__ = ["COCO_METRICS", "DetConfig", "DetOptim", "DetResult", "Detector", "ShapesDataset",
           "coco_box_metrics", "coco_dataset", "collate", "detection_loader", "eval_det",
           "load_det_recipe", "make_shapes_dataset", "metrics_table", "train_det"]
