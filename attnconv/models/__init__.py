"""The papers' networks, registered in timm's model registry, and :func:`create_model`."""

from __future__ import annotations

import difflib
from typing import Any

from torch import nn

from attnconv.models.resnet import (
    MODEL_ARGS,
    ZOO_MODELS,
    AttnResNet,
    build_resnet,
    load_official_rfa_checkpoint,
)


def list_models() -> list[str]:
    """Names :func:`create_model` accepts: the zoo and its plain baselines."""
    return sorted(MODEL_ARGS)


def create_model(name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Build a zoo network (``'resnet50_aw'``, ``'resnet18_rfa'``...) or a plain baseline
    (``'resnet18'``...) through the same generic builder, so that the same ``kwargs``
    (``num_classes``, ``cifar_stem=True``, ``channels=...``) give a fair pair.

    Zoo names also work with ``timm.create_model`` once ``attnconv`` is imported.
    """
    if name not in MODEL_ARGS:
        close = difflib.get_close_matches(name, MODEL_ARGS, n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"unknown model {name!r}: expected one of {list_models()}{hint}")
    return build_resnet(name, pretrained, **kwargs)


__all__ = [
    "MODEL_ARGS",
    "ZOO_MODELS",
    "AttnResNet",
    "create_model",
    "list_models",
    "load_official_rfa_checkpoint",
]
