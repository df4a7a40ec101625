"""The one place where classification builds a network from a name: the zoo's create_model."""

from __future__ import annotations

from typing import Any

from torch import nn

from attnconv.models import create_model

__all__ = ["build_model"]


def build_model(name: str, num_classes: int = 1000, in_chans: int = 3, **kwargs: Any
                ) -> nn.Module:
    """``name`` from the zoo with a ``num_classes`` head for ``in_chans``-channel images."""
    if "channels" in kwargs:  # YAML gives lists; timm's ResNet expects a tuple
        kwargs["channels"] = tuple(kwargs["channels"])
    return create_model(name, num_classes=num_classes, in_chans=in_chans, **kwargs)
