"""ResNets with attention convs: the networks of the AW and RFAConv papers, on timm's ResNet.

* AW-convolution: Zhu, Hofstee, Lee, Al-Ars, "An Attention Module for Convolutional Neural
  Networks", ICANN 2021, arXiv:2108.08205 -- AW in every bottleneck 3x3 conv of ResNet-50/101,
  alone or on top of SE / CBAM.
* RFAConv: Zhang et al., "RFAConv: Innovating Spatial Attention and Standard Convolutional
  Operation", arXiv:2304.03198 -- the layer replaces the first 3x3 conv of every BasicBlock of
  ResNet-18/34 (official ``classification/RF*resnet.py``).

One generic network, :class:`AttnResNet` (timm's ResNet plus ``conv_layer``, ``conv_placement``,
``attn_layer`` and ``cifar_stem``); every named model is an argument set over it. timm places
``attn_layer`` after the block's last BN, before the residual add, where SE and CBAM sit in their
papers. The replaced convs keep their module names (``layer1.0.conv1``) and their ``weight``, so
torchvision's and timm's ImageNet ResNet weights load into every variant with only the new
parameters missing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal

import timm.models.resnet as timm_resnet
import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, Bottleneck
from torch import nn

from attnconv.convert import conv_like
from attnconv.layers import get_attn, is_attention_conv
from attnconv.weights import read_state_dict

ConvPlacement = Literal["first_3x3", "every_3x3"]
PLACEMENTS: tuple[str, ...] = ("first_3x3", "every_3x3")


class AttnResNet(timm_resnet.ResNet):
    """timm's ResNet whose block 3x3 convs are ``create_conv(conv_layer, ...)``.

    Args:
        block, layers: as timm's ResNet (BasicBlock / Bottleneck, blocks per stage).
        conv_layer: conv factory name (``'conv'``, ``'aw'``, ``'rfa'``, ...) for the block convs.
        conv_placement: ``'first_3x3'`` -- the first 3x3 conv of each block (BasicBlock.conv1 as
            in the RFAConv paper; Bottleneck.conv2, its only 3x3, as in the AW paper);
            ``'every_3x3'`` -- both 3x3 convs of a BasicBlock as well.
        conv_args: extra arguments for the conv layer (``attn_channels``, ``bias``...).
        attn_layer: activation attention after each block's last BN (``'se'``, ``'cbam'``...).
        cifar_stem: a 3x3 stride-1 stem conv and no max-pool, for 32x32 (or 28x28) inputs.
        **kwargs: timm's ResNet arguments (``num_classes``, ``in_chans``, ``channels``,
            ``drop_rate``, ``drop_path_rate``, ``zero_init_last``...).
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: tuple[int, ...],
        conv_layer: str = "conv",
        conv_placement: ConvPlacement = "first_3x3",
        conv_args: dict[str, Any] | None = None,
        attn_layer: str | type[nn.Module] | None = None,
        cifar_stem: bool = False,
        **kwargs: Any,
    ) -> None:
        if conv_placement not in PLACEMENTS:
            raise ValueError(f"AttnResNet: conv_placement must be one of {PLACEMENTS}, "
                             f"got {conv_placement!r}")
        if cifar_stem and kwargs.get("stem_type", ""):
            raise ValueError("AttnResNet: cifar_stem replaces the stem; leave stem_type unset")
        block_args = dict(kwargs.pop("block_args", None) or {})
        if attn_layer is not None:
            block_args["attn_layer"] = get_attn(attn_layer) if isinstance(attn_layer, str) \
                else attn_layer
        super().__init__(block, layers, block_args=block_args, **kwargs)
        self.conv_layer = conv_layer
        self.conv_placement = conv_placement
        if cifar_stem:
            stem_out = self.conv1.out_channels
            self.conv1 = nn.Conv2d(self.in_chans, stem_out, 3, padding=1, bias=False)
            self.maxpool = nn.Identity()
            # Without the stem's stride-2 conv and max-pool every feature map is 4x larger.
            for info in self.feature_info:
                info["reduction"] = max(1, info["reduction"] // 4)
        if conv_layer != "conv" or conv_args:
            for name in self.block_conv_names():
                parent_name, _, child = name.rpartition(".")
                parent = self.get_submodule(parent_name)
                setattr(parent, child, conv_like(getattr(parent, child), conv_layer,
                                                 **(conv_args or {})))
        # timm initialised the plain convs; initialise the new layers the same way (the official
        # RFA ResNets kaiming-initialise every nn.Conv2d, inner ones included).
        self.init_weights(zero_init_last=kwargs.get("zero_init_last", True))

    def init_weights(self, zero_init_last: bool = True) -> None:
        super().init_weights(zero_init_last=zero_init_last)
        # timm's init re-initialises every nn.Conv2d, the attention's own sub-convs too (AW's
        # Pointconv2, which must start at zero): each layer restores its starting state.
        for module in self.modules():
            if is_attention_conv(module):
                module.reset_attention()

    def block_conv_names(self) -> list[str]:
        """Module names of the block convs that ``conv_layer`` replaces (or would replace)."""
        names = []
        for stage in ("layer1", "layer2", "layer3", "layer4"):
            for index, block in enumerate(getattr(self, stage)):
                if isinstance(block, Bottleneck):
                    names.append(f"{stage}.{index}.conv2")
                else:
                    names.append(f"{stage}.{index}.conv1")
                    if self.conv_placement == "every_3x3":
                        names.append(f"{stage}.{index}.conv2")
        return names


def load_official_rfa_checkpoint(
    model: AttnResNet, checkpoint: str | os.PathLike | Mapping[str, torch.Tensor]
) -> AttnResNet:
    """Load an ImageNet checkpoint of the official ``classification/RF*resnet.py`` ResNets
    (torchvision names, the RFA layer as ``layerX.Y.conv1``) into a zoo model such as
    ``resnet18_rfa``. Each RFA layer maps its official keys through its
    ``load_official_state_dict``; every other key must match the model exactly.

    Files are read with ``torch.load(weights_only=True)``: a checkpoint holds tensors, and one
    that tries to run code while unpickling is refused. Wrappers that training scripts add
    (``{'state_dict': ...}``, DataParallel's ``module.`` prefix) are removed.
    """
    state = read_state_dict(checkpoint)
    owned: list[str] = []
    for name in model.block_conv_names():
        layer = model.get_submodule(name)
        if not hasattr(layer, "load_official_state_dict"):
            raise ValueError(f"load_official_rfa_checkpoint: {name} is a "
                             f"{type(layer).__name__}, which has no official layout")
        prefix = f"{name}."
        layer_state = {k.removeprefix(prefix): state.pop(k) for k in list(state)
                       if k.startswith(prefix)}
        trailing = layer.load_official_state_dict(layer_state)
        if trailing:
            raise ValueError(f"load_official_rfa_checkpoint: {name} has a trailing "
                             f"BatchNorm ({sorted(trailing)}), not the ResNet layout")
        owned.append(prefix)
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(tuple(owned))]
    if missing or result.unexpected_keys:
        raise ValueError(f"load_official_rfa_checkpoint: missing keys {missing}, "
                         f"unexpected keys {result.unexpected_keys}")
    return model


# --- argument sets ---------------------------------------------------------------------------

_R18 = dict(block=BasicBlock, layers=(2, 2, 2, 2))
_R34 = dict(block=BasicBlock, layers=(3, 4, 6, 3))
_R50 = dict(block=Bottleneck, layers=(3, 4, 6, 3))
_R101 = dict(block=Bottleneck, layers=(3, 4, 23, 3))

#: Every network :func:`attnconv.create_model` builds, by name. Plain ResNets and timm's
#: ``seresnet*`` are here so that a baseline gets the same builder options (``cifar_stem``...)
#: as its attention variants; only the names timm lacks are registered with timm.
MODEL_ARGS: dict[str, dict[str, Any]] = {
    "resnet18": _R18,
    "resnet34": _R34,
    "resnet50": _R50,
    "resnet101": _R101,
    # SE baselines of the AW paper: timm's seresnet50/101 already match SE's paper (reduction
    # 16 with bias, after the last BN before the add), so they keep timm's names.
    "seresnet50": dict(_R50, attn_layer="se"),
    "seresnet101": dict(_R101, attn_layer="se"),
    # AW paper: AW in every bottleneck 3x3 conv.
    "resnet50_aw": dict(_R50, conv_layer="aw"),
    "resnet101_aw": dict(_R101, conv_layer="aw"),
    "resnet50_se_aw": dict(_R50, conv_layer="aw", attn_layer="se"),
    "resnet101_se_aw": dict(_R101, conv_layer="aw", attn_layer="se"),
    "resnet50_cbam_aw": dict(_R50, conv_layer="aw", attn_layer="cbam"),
    "resnet101_cbam_aw": dict(_R101, conv_layer="aw", attn_layer="cbam"),
    # CBAM baselines of the AW paper (timm registers no CBAM ResNet).
    "resnet50_cbam": dict(_R50, attn_layer="cbam"),
    "resnet101_cbam": dict(_R101, attn_layer="cbam"),
    # RFAConv paper: the layer as the first 3x3 conv of every BasicBlock, and its "attention,
    # then conv" baseline rows. The official layers' final conv has a bias; so do these (it is
    # part of the published parameter counts and of the official checkpoints).
    **{f"resnet{depth}_{conv}": dict(args, conv_layer=conv, conv_args=dict(bias=True))
       for depth, args in (("18", _R18), ("34", _R34))
       for conv in ("rfa", "rfcbam", "rfca", "camconv", "cbamconv", "caconv")},
    # Never trained in the paper (its RFAresnet50 leaves the bottleneck plain): RFA in every
    # bottleneck 3x3 conv.
    "resnet50_rfa": dict(_R50, conv_layer="rfa", conv_args=dict(bias=True)),
    # Not in the AW paper: cheap AW experiments, AW where the RFAConv paper puts its layer.
    "resnet18_aw": dict(_R18, conv_layer="aw"),
    "resnet34_aw": dict(_R34, conv_layer="aw"),
}

#: Names this module registers in timm's registry (MODEL_ARGS minus timm's own names).
ZOO_MODELS: tuple[str, ...] = tuple(
    name for name in MODEL_ARGS if name not in ("resnet18", "resnet34", "resnet50", "resnet101",
                                                "seresnet50", "seresnet101"))


def _cfg(**kwargs: Any) -> dict[str, Any]:
    # No weights are published for these networks (url ''): pretrained=True loads nothing.
    return dict(url="", num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7),
                crop_pct=0.875, interpolation="bilinear", mean=(0.485, 0.456, 0.406),
                std=(0.229, 0.224, 0.225), first_conv="conv1", classifier="fc",
                license="apache-2.0", **kwargs)


default_cfgs = generate_default_cfgs({name: _cfg() for name in ZOO_MODELS})


def build_resnet(name: str, pretrained: bool = False, **kwargs: Any) -> AttnResNet:
    """Build the network ``name`` of :data:`MODEL_ARGS` through timm's builder, so that
    ``features_only=True``, ``out_indices`` and ``pretrained_cfg`` work."""
    if pretrained and name in ZOO_MODELS:
        plain = name.split("_")[0]
        raise ValueError(
            f"no pretrained weights are published for {name} (none exist for attnconv's "
            f"networks yet); start from the plain network's ImageNet weights instead: "
            f"attnconv.pretrained.init_from(model, 'torchvision:{plain}'), or "
            f"`attnconv train --init torchvision:{plain}`")
    return build_model_with_cfg(AttnResNet, name, pretrained, **{**MODEL_ARGS[name], **kwargs})


#: What each registered name is (its docstring in timm's registry).
_ABOUT: dict[str, str] = {
    "resnet50_aw": 'ResNet-50 with AW in every bottleneck 3x3 (AW paper)',
    "resnet101_aw": 'ResNet-101 with AW in every bottleneck 3x3 (AW paper)',
    "resnet50_se_aw": 'SE-ResNet-50 with AW in every bottleneck 3x3 (AW paper, "SE + AW")',
    "resnet101_se_aw": 'SE-ResNet-101 with AW in every bottleneck 3x3 (AW paper, "SE + AW")',
    "resnet50_cbam_aw": 'CBAM-ResNet-50 with AW in every bottleneck 3x3 (AW paper, "CBAM + AW")',
    "resnet101_cbam_aw": 'CBAM-ResNet-101 with AW in every bottleneck 3x3 (AW paper)',
    "resnet50_cbam": "ResNet-50 with CBAM in every block (the AW paper's CBAM baseline)",
    "resnet101_cbam": "ResNet-101 with CBAM in every block (the AW paper's CBAM baseline)",
    "resnet18_rfa": 'ResNet-18, RFAConv as the first 3x3 conv of every block (RFAConv paper)',
    "resnet18_rfcbam": 'ResNet-18, RFCBAMConv as the first 3x3 conv of every block (RFAConv paper)',
    "resnet18_rfca": 'ResNet-18, RFCAConv as the first 3x3 conv of every block (RFAConv paper)',
    "resnet34_rfa": 'ResNet-34, RFAConv as the first 3x3 conv of every block (RFAConv paper)',
    "resnet34_rfcbam": 'ResNet-34, RFCBAMConv as the first 3x3 conv of every block (RFAConv paper)',
    "resnet34_rfca": 'ResNet-34, RFCAConv as the first 3x3 conv of every block (RFAConv paper)',
    "resnet18_camconv": 'ResNet-18, CAMConv as the first 3x3 conv of every block (RFAConv paper)',
    "resnet18_cbamconv": 'ResNet-18, CBAMConv as the first 3x3 conv of every block (RFAConv paper)',
    "resnet18_caconv": 'ResNet-18, CAConv as the first 3x3 conv of every block (RFAConv paper)',
    "resnet34_camconv": 'ResNet-34, CAMConv as the first 3x3 conv of every block (RFAConv paper)',
    "resnet34_cbamconv": 'ResNet-34, CBAMConv as the first 3x3 conv of every block (RFAConv paper)',
    "resnet34_caconv": 'ResNet-34, CAConv as the first 3x3 conv of every block (RFAConv paper)',
    "resnet50_rfa": 'ResNet-50 with RFAConv in every bottleneck 3x3 (not trained in the paper)',
    "resnet18_aw": 'ResNet-18, AW in the first 3x3 conv of every block (not in the AW paper)',
    "resnet34_aw": 'ResNet-34, AW in the first 3x3 conv of every block (not in the AW paper)',
}


def _entry_point(name: str) -> Any:
    """timm's registry wants one function per name; each is made from the table."""

    def entry(pretrained: bool = False, **kwargs: Any) -> AttnResNet:
        return build_resnet(name, pretrained, **kwargs)

    entry.__name__ = entry.__qualname__ = name
    entry.__module__ = __name__
    entry.__doc__ = _ABOUT[name]
    return register_model(entry)


for _name in ZOO_MODELS:
    globals()[_name] = _entry_point(_name)
