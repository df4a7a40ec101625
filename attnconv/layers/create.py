"""String factories for attention convs, so models and the CLI say ``conv='aw'`` and never
import a layer class (as timm's ``create_attn`` does for activation attention)."""

from __future__ import annotations

import difflib
from collections.abc import Callable

from torch import nn

from attnconv.layers.aw_conv import AWConv2d

ConvFactory = Callable[..., nn.Module]

#: name -> callable taking nn.Conv2d's arguments (in_channels, out_channels, kernel_size, ...).
CONV_LAYERS: dict[str, ConvFactory] = {
    "conv": nn.Conv2d,
    "aw": AWConv2d,
}


def _lookup(kind: str, registry: dict, name: str):
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
    ``create_conv('aw', 64, 64, 3, padding=1)``."""
    return get_conv(name)(in_channels, out_channels, kernel_size, stride, **kwargs)
