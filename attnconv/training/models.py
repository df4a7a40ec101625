"""The one place where training builds a network from a name: the zoo's create_model."""

from __future__ import annotations

import difflib
from typing import Any

from torch import nn


class ModelNameError(ValueError):
    """A model name that the zoo does not have."""


def model_names() -> list[str]:
    from attnconv.models import list_models
    return list_models()


def check_model_name(name: str) -> None:
    """ModelNameError listing close names when ``name`` is not in the zoo."""
    names = model_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
        hint = f"; close names: {', '.join(close)}" if close else ""
        raise ModelNameError(f"unknown model '{name}'{hint} (all: {', '.join(names)})")


def build_model(name: str, num_classes: int = 1000, in_chans: int = 3, **kwargs: Any
                ) -> nn.Module:
    """``name`` from the zoo with a ``num_classes`` head for ``in_chans``-channel images."""
    from attnconv.models import create_model

    check_model_name(name)
    if "channels" in kwargs:  # YAML gives lists; timm's ResNet expects a tuple
        kwargs["channels"] = tuple(kwargs["channels"])
    return create_model(name, num_classes=num_classes, in_chans=in_chans, **kwargs)
