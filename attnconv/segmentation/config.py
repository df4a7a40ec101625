"""Segmentation run configuration: the sections of ``attnconv train-seg`` over the shared config
system of :mod:`attnconv.engine.config` (the same recipes, ``--config`` and
``--section.key value`` options, type checks and ConfigError as classification and detection).

Without options a run is the CPU demo: DeepLabV3 over a narrow ResNet-18 on the generated
shapes. A recipe states ``model_args`` whole: none of the demo's settings leak into it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from attnconv.engine.config import MAX_IMAGE_SIDE, ConfigError, RunConfig, TrainerConfig, opt

#: The demo's model: narrow enough to train on 64 px shapes in minutes on 2 CPU cores.
DEMO_MODEL_ARGS: dict[str, Any] = {
    "backbone_args": {"channels": [16, 32, 64, 128]},
    "replace_stride_with_dilation": [False, True, True],
    "aux_loss": False,
}


@dataclass
class SegDataConfig:
    name: str = opt("shapes", "dataset: shapes (generated, no download), voc (VOC 2012), voc_aug "
                              "(VOC 2012 train + SBD), folder (ROOT/images/SPLIT, "
                              "ROOT/masks/SPLIT)",
                    choices=("shapes", "voc", "voc_aug", "folder"))
    root: str | None = opt(None, "dataset folder (voc: the folder holding VOCdevkit; shapes: "
                                 "where to generate, default RUN/data)")
    sbd_root: str | None = opt(None, "voc_aug: SBD folder (img/, cls/, train_noval.txt)")
    num_classes: int | None = opt(None, "folder: classes including background", min=2)
    base_size: int = opt(64, "short side of the training images before their random scale "
                             "(0.5-2x)", min=1, max=MAX_IMAGE_SIDE)
    crop_size: int = opt(64, "side of the square training crops", min=1, max=MAX_IMAGE_SIDE)
    eval_size: int | None = opt(None, "short side of the validation images; none: their own",
                                min=1, max=MAX_IMAGE_SIDE)
    batch_size: int = opt(8, "samples per batch on each device", min=1)
    num_workers: int = opt(0, "data-loading worker processes per device", min=0)
    num_train: int = opt(96, "shapes: generated training images", min=1)
    num_val: int = opt(24, "shapes: generated validation images", min=1)
    image_size: int = opt(64, "shapes: side of the generated images", min=32,
                          max=MAX_IMAGE_SIDE)


@dataclass
class SegOptimConfig:
    """SGD with the "poly" schedule of DeepLab: lr x (1 - step / steps) ** power, per step."""

    lr: float = opt(0.02, "learning rate (the auxiliary head's is 10x, as torchvision's "
                          "reference)", min=0.0)
    momentum: float = opt(0.9, "SGD momentum", min=0.0, max=1.0)
    weight_decay: float = opt(1e-4, "weight decay", min=0.0)
    power: float = opt(0.9, "poly schedule exponent", min=0.0)
    warmup_iters: int = opt(0, "optimizer steps of linear warm-up", min=0)
    aux_weight: float = opt(0.5, "weight of the auxiliary head's loss (with aux_loss)", min=0.0)


def _demo_trainer() -> TrainerConfig:
    return TrainerConfig(max_epochs=8, accelerator="cpu", devices="1", log_every_n_steps=5)


@dataclass
class SegmentationConfig(RunConfig):
    """The run of ``attnconv train-seg``: ``head`` over the backbone ``model``."""

    task: ClassVar[str] = "segmentation"
    command: ClassVar[str] = "train-seg"
    resume_applies: ClassVar[frozenset[str]] = frozenset({"data.num_workers", "data.root"})
    run_files: ClassVar[frozenset[str]] = frozenset({"seg_metrics.json", "seg_metrics.md"})
    run_inputs: ClassVar[frozenset[str]] = frozenset({"data"})

    model_args: dict = field(default_factory=lambda: dict(DEMO_MODEL_ARGS), metadata={
        "help": "keyword arguments of attnconv.models.segmentation.deeplabv3 / fcn (aux_loss, "
                "replace_stride_with_dilation, dilated_convs, backbone_args); a recipe states "
                "them all, an option changes the keys it names"})
    init: str | None = opt(None, "start the backbone from ImageNet weights: torchvision:NAME"
                                 "[.WEIGHTS], timm:NAME or a weights file (attention tensors "
                                 "keep their neutral start)")
    trainer: TrainerConfig = field(default_factory=_demo_trainer)
    head: str = opt("deeplabv3", "torchvision's head: deeplabv3 or fcn",
                    choices=("deeplabv3", "fcn"))
    data: SegDataConfig = field(default_factory=SegDataConfig)
    optim: SegOptimConfig = field(default_factory=SegOptimConfig)

    @property
    def run_name(self) -> str:
        return self.name or f"{self.head}_{self.model}-s{self.seed}"

    def check(self) -> None:
        """Also: a batch of one image for the deeplabv3 head."""
        super().check()
        if self.head == "deeplabv3" and self.data.batch_size < 2:
            # ASPP's image-pooling branch has one value per channel and image for its BatchNorm.
            raise ConfigError("data.batch_size must be >= 2 for head deeplabv3 (its "
                              "image-pooling BatchNorm cannot train on one image per batch), "
                              f"not {self.data.batch_size}; or use head fcn")


__all__ = ["DEMO_MODEL_ARGS", "SegDataConfig", "SegOptimConfig", "SegmentationConfig"]
