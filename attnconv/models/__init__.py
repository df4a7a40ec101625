"""The papers' networks, registered in timm's model registry, and :func:`create_model`."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

from torch import nn

from attnconv.models.resnet import (
    MODEL_ARGS,
    ZOO_MODELS,
    AttnResNet,
    build_resnet,
    load_official_rfa_checkpoint,
)


class ModelNameError(ValueError):
    """A model name that the zoo (or, where asked, timm) does not have."""


def check_model_name(name: str, extra: Sequence[str] = ()) -> None:
    """ModelNameError naming close names when ``name`` is neither in the zoo nor in ``extra``.

    The one model-name lookup: training, detection, the benchmark and export all call it.
    """
    if name in MODEL_ARGS or name in extra:
        return
    names = [*sorted(MODEL_ARGS), *extra]
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
    hint = f"; close names: {', '.join(close)}" if close else ""
    shown = ", ".join(sorted(MODEL_ARGS))
    raise ModelNameError(f"unknown model '{name}'{hint} (zoo: {shown}"
                         f"{'; or any timm model' if extra else ''})")


def list_models() -> list[str]:
    """Names :func:`create_model` accepts: the zoo and its plain baselines."""
    return sorted(MODEL_ARGS)


def create_model(name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Build a zoo network (``'resnet50_aw'``, ``'resnet18_rfa'``...) or a plain baseline
    (``'resnet18'``...) through the same generic builder, so that the same ``kwargs``
    (``num_classes``, ``cifar_stem=True``, ``channels=...``) give a fair pair.

    Zoo names also work with ``timm.create_model`` once ``attnconv`` is imported.
    """
    check_model_name(name)
    return build_resnet(name, pretrained, **kwargs)


__all__ = [
    "MODEL_ARGS",
    "ZOO_MODELS",
    "AttnResNet",
    "ModelNameError",
    "check_model_name",
    "create_model",
    "list_models",
    "load_official_rfa_checkpoint",
]
