"""String factories for attention convs and activation attentions, so models and the CLI say
``conv='rfa'`` or ``attn_layer='se'`` and never import a layer class (as timm's ``create_attn``
does for activation attention).

This module imports the layer classes and the layers never import it: :data:`CONV_LAYERS` is
here, :data:`ATTN_LAYERS` beside the activation attentions in :mod:`attnconv.layers.attention`
(an attention-then-conv layer looks its attention up there). A new attention conv is one file
with an :class:`attnconv.layers.base.AttentionConv2d` subclass and one line in
:data:`CONV_LAYERS`; the rest of the package asks
:func:`attnconv.layers.base.is_attention_conv`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import nn

from attnconv.layers.attention import ATTN_LAYERS, AttnConv2d, get_attn
from attnconv.layers.aw_conv import AWConv2d
from attnconv.layers.helpers import check_conv_args, lookup
from attnconv.layers.rfa_conv import RFAConv2d, RFCAConv2d, RFCBAMConv2d

__all__ = ["ATTN_LAYERS", "CONV_LAYERS", "create_attn", "create_conv", "get_attn", "get_conv"]

ConvFactory = Callable[..., nn.Module]


def conv2d(in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
           *args, **kwargs) -> nn.Conv2d:
    """A plain nn.Conv2d, its arguments checked as the attention convs check theirs (torch
    accepts a zero or negative kernel_size or stride and fails only at forward)."""
    check_conv_args("Conv2d", in_channels=in_channels, out_channels=out_channels,
                    kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation,
                    groups=groups)
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                     *args, **kwargs)

#: name -> callable taking nn.Conv2d's arguments (in_channels, out_channels, kernel_size, ...).
CONV_LAYERS: dict[str, ConvFactory] = {
    "conv": conv2d,
    "aw": AWConv2d,
    "rfa": RFAConv2d,
    "rfcbam": RFCBAMConv2d,
    "rfca": RFCAConv2d,
    "camconv": partial(AttnConv2d, attn_layer="cam"),
    "cbamconv": partial(AttnConv2d, attn_layer="cbam"),
    "caconv": partial(AttnConv2d, attn_layer="ca"),
}


def get_conv(name: str) -> ConvFactory:
    """The conv class registered under ``name`` (see :data:`CONV_LAYERS`)."""
    return lookup("conv layer", CONV_LAYERS, name)


def create_conv(name: str, in_channels: int, out_channels: int, kernel_size=3, stride=1,
                **kwargs) -> nn.Module:
    """Build the conv named ``name`` with nn.Conv2d's arguments, e.g.
    ``create_conv('rfa', 64, 64, 3, stride=2, padding=1)``."""
    return get_conv(name)(in_channels, out_channels, kernel_size, stride, **kwargs)


def create_attn(name: str, channels: int, **kwargs) -> nn.Module:
    """Build the attention named ``name``, e.g. ``create_attn('se', 256)``."""
    return get_attn(name)(channels, **kwargs)
