"""String factories for attention convs and activation attentions, so models and the CLI say
``conv='rfa'`` or ``attn_layer='se'`` and never import a layer class (as timm's ``create_attn``
does for activation attention)."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from functools import partial

from torch import nn

from attnconv.layers.attention import CAM, CBAM, ECA, SE, AttnConv2d, CoordAttention
from attnconv.layers.aw_conv import AWConv2d
from attnconv.layers.helpers import check_conv_args
from attnconv.layers.rfa_conv import RFAConv2d, RFCAConv2d, RFCBAMConv2d

ConvFactory = Callable[..., nn.Module]
AttnFactory = Callable[..., nn.Module]


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

#: name -> callable taking the channel count (timm's ``attn_layer(channels)`` slot).
ATTN_LAYERS: dict[str, AttnFactory] = {
    "se": SE,
    "cbam": CBAM,
    "cam": CAM,
    "ca": CoordAttention,
    "eca": ECA,
}


def _lookup(kind: str, registry: dict, name: str):
    if not isinstance(name, str):
        raise TypeError(f"{kind} name must be a string, one of {sorted(registry)}; got "
                        f"{type(name).__name__} {name!r}")
    if name not in registry:
        close = difflib.get_close_matches(name, registry, n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"unknown {kind} {name!r}: expected one of {sorted(registry)}{hint}")
    return registry[name]


def get_conv(name: str) -> ConvFactory:
    """The conv class registered under ``name`` (see :data:`CONV_LAYERS`)."""
    return _lookup("conv layer", CONV_LAYERS, name)


def create_conv(name: str, in_channels: int, out_channels: int, kernel_size=3, stride=1,
                **kwargs) -> nn.Module:
    """Build the conv named ``name`` with nn.Conv2d's arguments, e.g.
    ``create_conv('rfa', 64, 64, 3, stride=2, padding=1)``."""
    return get_conv(name)(in_channels, out_channels, kernel_size, stride, **kwargs)


def get_attn(name: str) -> AttnFactory:
    """The attention class registered under ``name`` (see :data:`ATTN_LAYERS`); it takes the
    channel count, so it fits timm's ``attn_layer`` argument."""
    return _lookup("attention layer", ATTN_LAYERS, name)


def create_attn(name: str, channels: int, **kwargs) -> nn.Module:
    """Build the attention named ``name``, e.g. ``create_attn('se', 256)``."""
    return get_attn(name)(channels, **kwargs)
