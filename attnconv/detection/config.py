"""Detection run configuration: the sections of ``attnconv train-det`` over the shared config
system of :mod:`attnconv.engine.config` (the same recipes, ``--config`` and
``--section.key value`` options, type checks and ConfigError as classification).

Without data paths a run generates the synthetic shapes dataset, and ``model_args`` defaults to
:data:`SYNTHETIC_MODEL_ARGS`; a recipe states ``model_args`` whole, so none of those small
settings leak into it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from attnconv.engine.config import MAX_IMAGE_SIDE, ConfigError, RunConfig, TrainerConfig, opt

#: Faster R-CNN settings for the synthetic 128 px shapes: a narrow backbone, small anchors and
#: few RoIs, so that CPU training takes minutes.
SYNTHETIC_MODEL_ARGS: dict[str, Any] = {
    "backbone_args": {"channels": [16, 32, 64, 128], "layers": [1, 1, 1, 1]},
    "fpn_channels": 32,
    "anchor_sizes": [8, 16, 32, 64, 128],
    "min_size": 128,
    "max_size": 128,
    "rpn_batch_size_per_image": 64,
    "rpn_pre_nms_top_n_train": 200,
    "rpn_post_nms_top_n_train": 50,
    "rpn_pre_nms_top_n_test": 200,
    "rpn_post_nms_top_n_test": 50,
    "box_batch_size_per_image": 32,
    "representation_size": 128,
}


@dataclass
class DetDataConfig:
    train_images: str | None = opt(None, "training image folder (none of the four paths: "
                                         "generate the synthetic shapes into RUN/data)")
    train_annotations: str | None = opt(None, "training COCO json")
    val_images: str | None = opt(None, "validation image folder")
    val_annotations: str | None = opt(None, "validation COCO json")
    num_classes: int | None = opt(None, "classes with background; none: largest category id "
                                        "+ 1", min=2)
    batch_size: int = opt(4, "images per batch on each device", min=1)
    num_workers: int = opt(0, "data-loading worker processes per device", min=0)
    synthetic_train: int = opt(128, "synthetic data: training images", min=1)
    synthetic_val: int = opt(32, "synthetic data: validation images", min=1)
    synthetic_size: int = opt(128, "synthetic data: image side in pixels", min=16,
                              max=MAX_IMAGE_SIDE)


@dataclass
class DetOptimConfig:
    """SGD as in Detectron2's COCO recipes; ``lr`` is for the whole batch as configured."""

    lr: float = opt(0.02, "learning rate for the total batch", min=0.0)
    momentum: float = opt(0.9, "SGD momentum", min=0.0, max=1.0)
    weight_decay: float = opt(1e-4, "weight decay", min=0.0)
    milestones: list[int] = field(default_factory=lambda: [8, 11], metadata={
        "help": "epochs after which lr is multiplied by gamma", "min": 0})
    gamma: float = opt(0.1, "lr factor at each milestone", above=0.0)
    warmup_iters: int = opt(500, "optimizer steps of linear warm-up", min=0)
    warmup_factor: float = opt(0.001, "lr factor at the first warm-up step", min=0.0, max=1.0)


def _detection_trainer() -> TrainerConfig:
    return TrainerConfig(max_epochs=6, accelerator="cpu", devices="1")


@dataclass
class DetectionConfig(RunConfig):
    """The run of ``attnconv train-det``: Faster R-CNN over the backbone ``model``."""

    task: ClassVar[str] = "detection"
    command: ClassVar[str] = "train-det"
    resume_applies: ClassVar[frozenset[str]] = frozenset({"data.num_workers"})
    run_files: ClassVar[frozenset[str]] = frozenset({"detector.pt", "coco_metrics.json",
                                                     "coco_metrics.csv"})
    run_inputs: ClassVar[frozenset[str]] = frozenset({"data"})

    model_args: dict = field(default_factory=lambda: dict(SYNTHETIC_MODEL_ARGS), metadata={
        "help": "keyword arguments of attnconv.models.detection.fasterrcnn (a recipe states "
                "them all; an option changes the keys it names)"})
    init: str | None = opt(None, "start the backbone from ImageNet weights: torchvision:NAME"
                                 "[.WEIGHTS], timm:NAME or a weights file (then frozen BN and "
                                 "model_args.trainable_layers apply, as in torchvision)")
    trainer: TrainerConfig = field(default_factory=_detection_trainer)
    data: DetDataConfig = field(default_factory=DetDataConfig)
    optim: DetOptimConfig = field(
        default_factory=lambda: DetOptimConfig(milestones=[4, 5], warmup_iters=50))

    @property
    def run_name(self) -> str:
        return self.name or f"fasterrcnn_{self.model}-s{self.seed}"

    def check(self) -> None:
        """Also: a data section naming only some of the four paths, a ``model_args`` key
        Faster R-CNN does not take."""
        from attnconv.models.detection import check_fasterrcnn_args

        super().check()
        data = self.data
        paths = (data.train_images, data.train_annotations, data.val_images,
                 data.val_annotations)
        if any(p is not None for p in paths) and None in paths:
            raise ConfigError("give all four of data.train_images, data.train_annotations, "
                              "data.val_images, data.val_annotations (or none for synthetic "
                              "data)")
        if "pretrained_backbone" in self.model_args:
            raise ConfigError("model_args.pretrained_backbone: give the backbone's weights as "
                              "init (--init torchvision:resnet50, timm:NAME or a weights file)")
        try:
            check_fasterrcnn_args(self.model_args)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"model_args: {err}") from err
