"""ultralytics' Conv block (conv -> BN -> act) with an attention conv, one class per layer.

The blocks are not ``Conv`` subclasses on purpose: ``model.fuse()`` folds BN into
``Conv.conv`` by rebuilding it as a plain ``nn.Conv2d``, which would drop the attention.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

import torch
from torch import nn
from ultralytics.nn.modules.conv import Conv, autopad

from attnconv.layers import create_conv, get_conv

__all__ = ["BLOCKS", "CSP_BLOCKS", "CSP_NAMES", "AWConv", "AttnConvBlock", "RFAConv",
           "RFCAConv", "RFCBAMConv"]


class AttnConvBlock(nn.Module):
    """ultralytics' ``Conv(c1, c2, k, s, p, g, d, act)`` with ``create_conv(conv_name, ...)``."""

    conv_name: ClassVar[str] = "conv"

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, p: int | None = None,
                 g: int = 1, d: int = 1, act: bool | nn.Module = True) -> None:
        super().__init__()
        # The RFA layers reject dilation and groups they cannot honour; pass them only if set.
        extra: dict[str, Any] = {}
        if g != 1:
            extra["groups"] = g
        if d != 1:
            extra["dilation"] = d
        # Layers whose padding=None means their own k // 2 (the RFA family) get None when the
        # YAML leaves p to autopad: autopad's dilated padding would be refused, not the dilation.
        own_padding = inspect.signature(get_conv(self.conv_name)).parameters["padding"].default
        padding = None if p is None and own_padding is None else autopad(k, p, d)
        self.conv = create_conv(self.conv_name, c1, c2, k, s, padding=padding, bias=False,
                                **extra)
        self.bn = nn.BatchNorm2d(c2)
        self.act = (Conv.default_act if act is True
                    else act if isinstance(act, nn.Module) else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class RFAConv(AttnConvBlock):
    """Conv block with :class:`attnconv.layers.RFAConv2d`."""

    conv_name = "rfa"


class RFCBAMConv(AttnConvBlock):
    """Conv block with :class:`attnconv.layers.RFCBAMConv2d`."""

    conv_name = "rfcbam"


class RFCAConv(AttnConvBlock):
    """Conv block with :class:`attnconv.layers.RFCAConv2d`."""

    conv_name = "rfca"


class AWConv(AttnConvBlock):
    """Conv block with :class:`attnconv.layers.AWConv2d`."""

    conv_name = "aw"


#: YAML name -> block class.
BLOCKS: dict[str, type[AttnConvBlock]] = {
    cls.__name__: cls for cls in (RFAConv, RFCBAMConv, RFCAConv, AWConv)}

#: ultralytics' CSP blocks whose bottlenecks can carry the attention blocks (YOLOv5, v8, 11).
CSP_NAMES: tuple[str, ...] = ("C3", "C2f", "C3k2")

#: YAML name (``'C3k2_RFAConv'``...) -> (ultralytics' CSP block, attention block).
CSP_BLOCKS: dict[str, tuple[str, type[AttnConvBlock]]] = {
    f"{csp}_{name}": (csp, cls) for csp in CSP_NAMES for name, cls in BLOCKS.items()}
