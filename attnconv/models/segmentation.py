"""Semantic segmentation over any zoo ResNet (plain, SE, CBAM, AW, SE+AW, RFA family), built
from torchvision's segmentation parts.

* DeepLabV3: Chen et al., "Rethinking Atrous Convolution for Semantic Image Segmentation",
  arXiv:1706.05587 -- ASPP head (torchvision's ``DeepLabHead``) over a dilated ResNet.
* FCN: Long, Shelhamer, Darrell, CVPR 2015 -- torchvision's ``FCNHead``.
* AW-convolution: Zhu et al., ICANN 2021, arXiv:2108.08205; RFAConv: Zhang et al.,
  arXiv:2304.03198 (the paper evaluates segmentation but publishes no setup; a dilated ResNet
  under DeepLabV3 / FCN is the classic choice).

:func:`deeplabv3` and :func:`fcn` are torchvision's ``deeplabv3_resnet50`` / ``fcn_resnet50``
builders for networks of :func:`attnconv.create_model`: the same heads, the same optional
auxiliary FCN head on ``layer3``, and the same ``replace_stride_with_dilation`` (default
``(False, True, True)``: output stride 8). Dilation comes from timm's ``output_stride``, which
dilates exactly as torchvision does (a stage's first block keeps the previous dilation).

Where the RFA layers can go: RFAConv, RFCBAMConv and RFCAConv define attention on the k x k
receptive field of an undilated conv and reject dilation. A dilated stage's first block keeps
the previous dilation, so the block convs with dilation 1 are

* ``(False, False, False)`` (output stride 32): all of them;
* ``(False, False, True)`` (16): layer1, layer2, layer3 and ``layer4.0``;
* ``(False, True, True)`` (8): layer1, layer2 and ``layer3.0``.

By default a backbone whose RFA convs would be dilated is refused with that list
(:func:`undilated_block_convs`); ``dilated_convs='plain'`` keeps those convs plain dilated 3x3
convs and puts the layer everywhere else. AW, SE, CBAM and the "attention, then conv" rows take
dilation and are dilated like the plain network.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.segmentation.deeplabv3 import DeepLabHead, DeepLabV3
from torchvision.models.segmentation.fcn import FCN, FCNHead

from attnconv.convert import conv_like
from attnconv.layers import create_conv
from attnconv.models.detection import load_backbone_weights
from attnconv.pretrained import InitReport

DilatedConvs = Literal["error", "plain"]

#: torchvision's replace_stride_with_dilation -> timm's output_stride (the combinations timm
#: builds; torchvision's segmentation builders use (False, True, True)).
OUTPUT_STRIDES: dict[tuple[bool, bool, bool], int] = {
    (False, False, False): 32, (False, False, True): 16, (False, True, True): 8}


def output_stride(replace_stride_with_dilation: Sequence[bool]) -> int:
    """The output stride that torchvision's ``replace_stride_with_dilation`` gives."""
    key = tuple(bool(v) for v in replace_stride_with_dilation)
    if key not in OUTPUT_STRIDES:
        raise ValueError(f"replace_stride_with_dilation must be one of "
                         f"{[list(k) for k in OUTPUT_STRIDES]}, got "
                         f"{list(replace_stride_with_dilation)}")
    return OUTPUT_STRIDES[key]


def accepts_dilation(conv_layer: str) -> bool:
    """Whether the conv named ``conv_layer`` can be dilated (the RFA family cannot)."""
    try:
        create_conv(conv_layer, 4, 4, 3, padding=2, dilation=2)
    except ValueError:
        return False
    return True


def undilated_block_convs(model: nn.Module) -> list[str]:
    """Block conv names (``model.block_conv_names()``) whose conv has dilation 1."""
    return [n for n in model.block_conv_names() if model.get_submodule(n).dilation == (1, 1)]


def segmentation_backbone(
    name: str,
    replace_stride_with_dilation: Sequence[bool] = (False, True, True),
    *,
    dilated_convs: DilatedConvs = "error",
    pretrained_backbone: str | Path | None = None,
    backbone_args: Mapping[str, Any] | None = None,
) -> tuple[nn.Module, InitReport | None]:
    """The zoo ResNet ``name`` without classifier, dilated as torchvision's segmentation models
    are, and what ``pretrained_backbone`` filled (None without one): ImageNet weights as
    ``torchvision:NAME``, ``timm:NAME`` or a weights file (:func:`attnconv.pretrained.init_from`:
    attention tensors keep their neutral start)."""
    from attnconv.models import MODEL_ARGS, create_model

    if dilated_convs not in ("error", "plain"):
        raise ValueError(f"dilated_convs must be 'error' or 'plain', got {dilated_convs!r}")
    stride = output_stride(replace_stride_with_dilation)
    args = dict(backbone_args or {})
    spec = MODEL_ARGS.get(name, {})
    conv_layer = args.get("conv_layer", spec.get("conv_layer", "conv"))
    if stride == 32 or accepts_dilation(conv_layer):
        model = create_model(name, num_classes=0, output_stride=stride, **args)
    else:
        conv_args = dict(args.pop("conv_args", spec.get("conv_args")) or {})
        # Built plain (bias-free, as a plain ResNet's convs, so ImageNet weights fit the convs
        # that stay plain), then the layer goes where the conv is undilated.
        args.update(conv_layer="conv", conv_args={})
        model = create_model(name, num_classes=0, output_stride=stride, **args)
        keep = set(undilated_block_convs(model))
        dilated = [n for n in model.block_conv_names() if n not in keep]
        if dilated_convs == "error":
            raise ValueError(
                f"{name}: {conv_layer} convs reject dilation, and replace_stride_with_dilation="
                f"{list(replace_stride_with_dilation)} dilates {', '.join(dilated)}; with it "
                f"the layer fits only {', '.join(sorted(keep))}: pass dilated_convs='plain' "
                "to keep the dilated convs plain, or no dilation (False, False, False)")
        for conv_name in keep:
            parent, _, child = conv_name.rpartition(".")
            module = model.get_submodule(parent)
            setattr(module, child, conv_like(getattr(module, child), conv_layer, **conv_args))
        model.conv_layer = conv_layer
        model.init_weights()  # the RFA layers' own initialisation, as AttnResNet does
    report = None
    if pretrained_backbone is not None:
        report = load_backbone_weights(model, pretrained_backbone)
    return model, report


def _widths(backbone: nn.Module) -> dict[str, int]:
    return {info["module"]: info["num_chs"] for info in backbone.feature_info}


def _build(head: str, backbone: str | nn.Module, num_classes: int, aux_loss: bool,
           replace_stride_with_dilation: Sequence[bool], dilated_convs: DilatedConvs,
           pretrained_backbone: str | Path | None,
           backbone_args: Mapping[str, Any] | None) -> nn.Module:
    report = None
    if isinstance(backbone, str):
        backbone, report = segmentation_backbone(
            backbone, replace_stride_with_dilation, dilated_convs=dilated_convs,
            pretrained_backbone=pretrained_backbone, backbone_args=backbone_args)
    widths = _widths(backbone)
    return_layers = {"layer4": "out"}
    if aux_loss:
        return_layers["layer3"] = "aux"
    body = IntermediateLayerGetter(backbone, return_layers=return_layers)
    aux = FCNHead(widths["layer3"], num_classes) if aux_loss else None
    if head == "deeplabv3":
        model = DeepLabV3(body, DeepLabHead(widths["layer4"], num_classes), aux)
    else:
        model = FCN(body, FCNHead(widths["layer4"], num_classes), aux)
    model.load_report = report
    return model


def deeplabv3(
    backbone: str | nn.Module = "resnet50",
    num_classes: int = 21,
    *,
    aux_loss: bool = False,
    replace_stride_with_dilation: Sequence[bool] = (False, True, True),
    dilated_convs: DilatedConvs = "error",
    pretrained_backbone: str | Path | None = None,
    backbone_args: Mapping[str, Any] | None = None,
) -> DeepLabV3:
    """torchvision's DeepLabV3 (ASPP head; auxiliary FCN head on layer3 with ``aux_loss``) over
    the zoo ResNet ``backbone`` (a name, or a built zoo ResNet with ``feature_info``).

    Args:
        num_classes: classes including background (21 for Pascal VOC).
        replace_stride_with_dilation: as torchvision's ResNet, for layer2..4.
        dilated_convs: RFA family only: ``'error'`` or ``'plain'`` (see the module docstring).
        pretrained_backbone: ImageNet weights of the backbone: ``torchvision:NAME``,
            ``timm:NAME`` or a weights file; ``model.load_report`` says what it filled.
        backbone_args: keyword arguments of :func:`attnconv.create_model`.
    """
    return _build("deeplabv3", backbone, num_classes, aux_loss, replace_stride_with_dilation,
                  dilated_convs, pretrained_backbone, backbone_args)


def fcn(
    backbone: str | nn.Module = "resnet50",
    num_classes: int = 21,
    *,
    aux_loss: bool = False,
    replace_stride_with_dilation: Sequence[bool] = (False, True, True),
    dilated_convs: DilatedConvs = "error",
    pretrained_backbone: str | Path | None = None,
    backbone_args: Mapping[str, Any] | None = None,
) -> FCN:
    """torchvision's FCN (``FCNHead``) over the zoo ResNet ``backbone``; arguments as
    :func:`deeplabv3`."""
    return _build("fcn", backbone, num_classes, aux_loss, replace_stride_with_dilation,
                  dilated_convs, pretrained_backbone, backbone_args)


#: Head name -> builder, for configs and the command line.
SEGMENTATION_HEADS = {"deeplabv3": deeplabv3, "fcn": fcn}


def create_segmentation_model(head: str, backbone: str, num_classes: int,
                              **kwargs: Any) -> nn.Module:
    """``deeplabv3(backbone, ...)`` or ``fcn(backbone, ...)`` by head name."""
    if head not in SEGMENTATION_HEADS:
        raise ValueError(f"unknown segmentation head {head!r}: expected one of "
                         f"{sorted(SEGMENTATION_HEADS)}")
    return SEGMENTATION_HEADS[head](backbone, num_classes, **kwargs)


__all__ = ["OUTPUT_STRIDES", "SEGMENTATION_HEADS", "accepts_dilation", "create_segmentation_model",
           "deeplabv3", "fcn", "output_stride", "segmentation_backbone", "undilated_block_convs"]
