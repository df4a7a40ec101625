"""Faster R-CNN with a feature pyramid over any zoo ResNet (plain, SE, CBAM, AW, SE+AW, CBAM+AW,
RFA family), built from torchvision's detection parts.

* AW-convolution: Zhu, Hofstee, Lee, Al-Ars, ICANN 2021, arXiv:2108.08205 -- the paper's COCO
  experiment is Faster R-CNN ResNet-101-FPN, 1x schedule
  (the shipped recipe ``fasterrcnn_r101_aw_coco_1x``).
* RFAConv: Zhang et al., arXiv:2304.03198.

:func:`resnet_fpn_backbone` is torchvision's function of the same name for networks of
:func:`attnconv.create_model`: the same stage names, frozen BN, trainable-layer rule and
``BackboneWithFPN``; only the ResNet comes from the zoo (timm's ResNet with torchvision's
state-dict names), so torchvision/timm ImageNet weights and the classification engine's
checkpoints load into it.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from timm.layers import freeze_batch_norm_2d
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from attnconv.pretrained import InitReport, init_from

#: Keyword arguments FasterRCNN takes (its **kwargs go to the transform, which ignores them).
_FASTERRCNN_ARGS = frozenset(inspect.signature(FasterRCNN.__init__).parameters) - {
    "self", "backbone", "num_classes", "kwargs"}

#: Stages from the top, in torchvision's order for ``trainable_layers``.
_STAGES = ("layer4", "layer3", "layer2", "layer1", "conv1")


def create_backbone(name: str, **kwargs: Any) -> nn.Module:
    """The zoo ResNet ``name`` without its classifier (``num_classes=0``)."""
    from attnconv.models import create_model

    return create_model(name, num_classes=0, **kwargs)


def load_backbone_weights(backbone: nn.Module, source: str | Path) -> InitReport:
    """Fill ``backbone`` from ImageNet weights (``torchvision:NAME``, ``timm:NAME`` or a weights
    file, as :func:`attnconv.pretrained.init_from`): the classifier is skipped, attention tensors
    keep their neutral start, and a checkpoint of another network raises InitError."""
    return init_from(backbone, str(source))


def _check_trainable_layers(trainable_layers: int | None, pretrained: bool) -> int:
    # torchvision's rule: without pretrained weights every layer trains.
    if trainable_layers is None:
        return 3 if pretrained else 5
    if not 0 <= trainable_layers <= 5:
        raise ValueError(f"trainable_layers must be in [0, 5], got {trainable_layers}")
    return trainable_layers


def resnet_fpn_backbone(
    backbone: str | nn.Module = "resnet101_aw",
    *,
    pretrained_backbone: str | Path | None = None,
    trainable_layers: int | None = None,
    norm_layer: type[nn.Module] | None = None,
    returned_layers: Sequence[int] = (1, 2, 3, 4),
    fpn_channels: int = 256,
    extra_blocks: ExtraFPNBlock | None = None,
    backbone_args: Mapping[str, Any] | None = None,
) -> BackboneWithFPN:
    """A zoo ResNet (by name, or built) with torchvision's FPN on ``returned_layers``;
    ``.load_report`` (an :class:`attnconv.pretrained.InitReport`) says what
    ``pretrained_backbone`` filled.

    ``norm_layer`` None follows torchvision's Faster R-CNN builders: FrozenBatchNorm2d when
    weights load (detection batches are too small for batch statistics), BatchNorm2d when the
    backbone trains from scratch (frozen identity statistics would leave it unnormalised).
    FrozenBatchNorm2d also freezes BNs inside attention layers (RFA's, coordinate attention's).
    """
    pretrained = pretrained_backbone is not None
    report = None
    trainable_layers = _check_trainable_layers(trainable_layers, pretrained)
    if norm_layer is None:
        norm_layer = FrozenBatchNorm2d if pretrained else nn.BatchNorm2d
    frozen = issubclass(norm_layer, FrozenBatchNorm2d)
    if isinstance(backbone, str):
        args = dict(backbone_args or {})
        if not frozen and norm_layer is not nn.BatchNorm2d:
            args["norm_layer"] = norm_layer
        backbone = create_backbone(backbone, **args)
    if pretrained:
        report = load_backbone_weights(backbone, pretrained_backbone)
    if frozen:
        # The checkpoint loads into ordinary BNs first, then every BN is frozen with its
        # statistics (timm builds norm layers with device/dtype, which FrozenBatchNorm2d lacks).
        backbone = freeze_batch_norm_2d(backbone)

    layers_to_train = list(_STAGES[:trainable_layers])
    if trainable_layers == 5:
        layers_to_train.append("bn1")
    for name, parameter in backbone.named_parameters():
        if not name.startswith(tuple(layers_to_train)):
            parameter.requires_grad_(False)

    if not returned_layers or min(returned_layers) < 1 or max(returned_layers) > 4:
        raise ValueError(f"returned_layers must be a non-empty subset of 1..4, got "
                         f"{returned_layers}")
    widths = {info["module"]: info["num_chs"] for info in backbone.feature_info}
    return_layers = {f"layer{k}": str(i) for i, k in enumerate(returned_layers)}
    in_channels_list = [widths[f"layer{k}"] for k in returned_layers]
    fpn = BackboneWithFPN(backbone, return_layers, in_channels_list, fpn_channels,
                          extra_blocks=extra_blocks or LastLevelMaxPool())
    fpn.load_report = report  # what the checkpoint did not fill; None without one
    return fpn


def check_fasterrcnn_args(kwargs: Mapping[str, Any]) -> None:
    """TypeError naming close names for a keyword :func:`fasterrcnn` does not take;
    ValueError for image sides (``min_size``, ``max_size``) under one pixel."""
    known = _FASTERRCNN_ARGS | set(inspect.signature(fasterrcnn).parameters) - {"kwargs"}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        close = difflib.get_close_matches(unknown[0], known, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise TypeError(f"fasterrcnn() got unknown argument(s) {', '.join(unknown)}{hint}")
    for key in ("min_size", "max_size"):  # the sides images are resized to
        sides = kwargs.get(key)
        if sides is None:
            continue
        sides = list(sides) if isinstance(sides, list | tuple) else [sides]
        if not sides or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1
                                for v in sides):
            raise ValueError(f"{key} must be a side in pixels >= 1"
                             f"{' (or a list of them)' if key == 'min_size' else ''}, not "
                             f"{kwargs[key]!r}")


def fasterrcnn(
    backbone: str | nn.Module = "resnet101_aw",
    num_classes: int = 91,
    *,
    pretrained_backbone: str | Path | None = None,
    trainable_layers: int | None = None,
    norm_layer: type[nn.Module] | None = None,
    returned_layers: Sequence[int] = (1, 2, 3, 4),
    fpn_channels: int = 256,
    anchor_sizes: Sequence[int] | None = None,
    representation_size: int = 1024,
    backbone_args: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> FasterRCNN:
    """torchvision's Faster R-CNN over ``resnet_fpn_backbone(backbone, ...)``.

    Args:
        backbone: zoo name (``'resnet50'``, ``'resnet101_aw'``, ``'resnet50_se_aw'``,
            ``'resnet18_rfa'``...) or a built zoo ResNet.
        num_classes: classes including background (91 for COCO's category ids).
        pretrained_backbone: ImageNet weights of the backbone: ``torchvision:NAME``,
            ``timm:NAME`` or a weights file (see :func:`attnconv.pretrained.init_from`).
        trainable_layers, norm_layer, returned_layers, fpn_channels: as torchvision's
            ``resnet_fpn_backbone`` (see :func:`resnet_fpn_backbone` for the defaults).
        anchor_sizes: one anchor size per pyramid level (default torchvision's 32..512),
            each with aspect ratios 0.5, 1, 2.
        representation_size: width of the box head's two fully connected layers
            (torchvision's TwoMLPHead; 1024 in torchvision and Detectron).
        backbone_args: keyword arguments of :func:`attnconv.create_model` (``channels``...).
        **kwargs: FasterRCNN's arguments (``min_size``, ``max_size``,
            ``box_detections_per_img``...); a name FasterRCNN does not take raises TypeError
            (FasterRCNN itself would pass it on to its transform, which ignores it).
    """
    check_fasterrcnn_args(kwargs)
    body = resnet_fpn_backbone(backbone, pretrained_backbone=pretrained_backbone,
                               trainable_layers=trainable_layers, norm_layer=norm_layer,
                               returned_layers=returned_layers, fpn_channels=fpn_channels,
                               backbone_args=backbone_args)
    if anchor_sizes is not None:
        levels = len(returned_layers) + 1  # LastLevelMaxPool adds one level
        if len(anchor_sizes) != levels:
            raise ValueError(f"anchor_sizes needs one size per pyramid level ({levels}), "
                             f"got {list(anchor_sizes)}")
        kwargs["rpn_anchor_generator"] = AnchorGenerator(
            tuple((s,) for s in anchor_sizes), ((0.5, 1.0, 2.0),) * levels)
    if "box_head" not in kwargs:
        pool = kwargs.get("box_roi_pool")
        resolution = pool.output_size[0] if pool is not None else 7  # FasterRCNN's default pool
        kwargs["box_head"] = TwoMLPHead(body.out_channels * resolution**2, representation_size)
    if "box_predictor" not in kwargs:
        kwargs["box_predictor"] = FastRCNNPredictor(representation_size, num_classes)
    # FasterRCNN wants num_classes None when a box predictor is given.
    return FasterRCNN(body, num_classes=None, **kwargs)


__all__ = ["check_fasterrcnn_args", "create_backbone", "fasterrcnn",
           "load_backbone_weights", "resnet_fpn_backbone"]
