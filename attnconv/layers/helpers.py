"""Argument and input checks shared by every attention conv, so they all fail the same way."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def check_positive(layer: str, **values: int | Iterable[int]) -> None:
    """Raise a ValueError naming ``layer`` for any size that is not a positive integer."""
    for name, value in values.items():
        items = tuple(value) if isinstance(value, Iterable) else (value,)
        if not items or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in items):
            raise ValueError(f"{layer}: {name} must be a positive integer (or tuple of them), "
                             f"got {value!r}")


def check_conv_input(layer: nn.Module, x: torch.Tensor, in_channels: int) -> None:
    """Raise a ValueError naming ``layer`` unless ``x`` is (N, in_channels, H, W)."""
    if x.dim() != 4 or x.shape[1] != in_channels:
        raise ValueError(f"{layer_name(layer)}: expected input of shape (N, {in_channels}, H, W), "
                         f"got {tuple(x.shape)}")


def layer_name(layer: nn.Module) -> str:
    """``ClassName(extra_repr)``, the way the layer prints, for error messages."""
    return f"{type(layer).__name__}({layer.extra_repr()})"
