"""Argument and input checks shared by every attention conv, so they all fail the same way:
one ValueError (a wrong value) or TypeError (a wrong type) at construction, naming the layer,
the argument and what was expected."""

from __future__ import annotations

import difflib
import operator
from collections.abc import Mapping
from typing import TypeVar

import torch
from torch import nn

from attnconv.functional._common import is_exporting as is_exporting  # the layers' question

PADDING_STRINGS = ("same", "valid")

T = TypeVar("T")


def _as_int(value: object) -> int | None:
    """``value`` as an int if it is one (Python or NumPy integers, not bools), else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_positive(layer: str, **values: object) -> None:
    """Every value must be an integer >= 1 (channels, groups, widths)."""
    for name, value in values.items():
        check_int(layer, name, value)


def check_int(layer: str, name: str, value: object, minimum: int = 1) -> int:
    """``value`` must be an integer >= ``minimum``; returns it."""
    what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    number = _as_int(value)
    if number is None:
        raise TypeError(f"{layer}: {name} must be {what}, got {type(value).__name__} {value!r}")
    if number < minimum:
        raise ValueError(f"{layer}: {name} must be {what}, got {value!r}")
    return number


def check_pair(layer: str, name: str, value: object, minimum: int = 1) -> tuple[int, int]:
    """``value`` must be an integer >= ``minimum`` or a tuple/list of two; returns the pair."""
    what = ("a positive integer (or a pair of them)" if minimum == 1
            else f"an integer >= {minimum} (or a pair of them)")
    if isinstance(value, tuple | list):
        if len(value) != 2:
            raise ValueError(f"{layer}: {name} must be {what}, got {len(value)} values "
                             f"{value!r}")
        items = tuple(value)
    else:
        items = (value, value)
    numbers = tuple(_as_int(v) for v in items)
    if any(n is None for n in numbers):
        raise TypeError(f"{layer}: {name} must be {what}, got {type(value).__name__} {value!r}")
    if any(n < minimum for n in numbers):
        raise ValueError(f"{layer}: {name} must be {what}, got {value!r}")
    return numbers  # type: ignore[return-value]


def check_conv_args(layer: str, *, in_channels: object, out_channels: object,
                    kernel_size: object, stride: object, padding: object, dilation: object,
                    groups: object, padding_none: bool = False) -> None:
    """nn.Conv2d's geometry: channels, kernel_size, stride, dilation and groups positive
    integers (sizes may be pairs), padding a non-negative integer or pair, or 'same'/'valid'
    (or None where ``padding_none``), and channels divisible by groups."""
    check_positive(layer, in_channels=in_channels, out_channels=out_channels, groups=groups)
    check_pair(layer, "kernel_size", kernel_size)
    check_pair(layer, "stride", stride)
    check_pair(layer, "dilation", dilation)
    if isinstance(padding, str):
        if padding not in PADDING_STRINGS:
            raise ValueError(f"{layer}: padding must be an integer >= 0, a pair of them or one "
                             f"of {PADDING_STRINGS}, got {padding!r}")
    elif not (padding is None and padding_none):
        check_pair(layer, "padding", padding, minimum=0)
    for name, channels in (("in_channels", in_channels), ("out_channels", out_channels)):
        if operator.index(channels) % operator.index(groups):
            raise ValueError(f"{layer}: {name} must be divisible by groups, got {name}="
                             f"{channels!r}, groups={groups!r}")


def check_conv_input(layer: nn.Module, x: torch.Tensor, in_channels: int) -> None:
    """Raise a ValueError naming ``layer`` unless ``x`` is (N, in_channels, H, W), and a
    TypeError unless it is floating point (nn.Conv2d refuses integer and bool input too)."""
    if x.dim() != 4 or x.shape[1] != in_channels:
        raise ValueError(f"{layer_name(layer)}: expected input of shape (N, {in_channels}, H, W), "
                         f"got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{layer_name(layer)}: expected a floating-point input (float32, "
                        f"float64, bfloat16 or float16), got {x.dtype}")


def layer_name(layer: nn.Module) -> str:
    """``ClassName(extra_repr)``, the way the layer prints, for error messages."""
    return f"{type(layer).__name__}({layer.extra_repr()})"


def lookup(kind: str, registry: Mapping[str, T], name: object) -> T:
    """``registry[name]``, or a TypeError (not a string) / ValueError (unknown name, with the
    close names) saying which names ``kind`` takes."""
    if not isinstance(name, str):
        raise TypeError(f"{kind} name must be a string, one of {sorted(registry)}; got "
                        f"{type(name).__name__} {name!r}")
    if name not in registry:
        close = difflib.get_close_matches(name, registry, n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"unknown {kind} {name!r}: expected one of {sorted(registry)}{hint}")
    return registry[name]
