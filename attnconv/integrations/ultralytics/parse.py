"""The attention blocks by name in ultralytics model YAMLs: a wrapped ``parse_model``.

``ultralytics.nn.tasks.parse_model`` decides each layer's input and output channels from a set
of module classes local to the function, so it cannot be extended from outside.
:func:`register` wraps it: the rows naming these blocks are parsed as ``Conv`` (or as the plain
CSP block; same signatures, so width scaling and ``max_channels`` apply unchanged), then each
built Conv is replaced by the attention block with the same channels, kernel, stride, padding
and activation.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

from torch import nn
from ultralytics.nn import tasks
from ultralytics.nn.modules.conv import Conv
from ultralytics.utils import LOGGER

from attnconv.integrations.ultralytics.blocks import BLOCKS, CSP_BLOCKS, AttnConvBlock

__all__ = ["register"]

_original_parse_model: Callable | None = None


def _as_block(conv: Conv, cls: type[AttnConvBlock]) -> AttnConvBlock:
    c = conv.conv
    return cls(c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0], c.padding[0],
               c.groups, c.dilation[0], act=conv.act)


def _swap_bottleneck_convs(block: nn.Module, cls: type[AttnConvBlock]) -> int:
    """Replace ``cv2`` of every ultralytics ``Bottleneck`` inside ``block``; returns how many."""
    from ultralytics.nn.modules.block import Bottleneck

    bottlenecks = [m for m in block.modules() if isinstance(m, Bottleneck)]
    for bottleneck in bottlenecks:
        bottleneck.cv2 = _as_block(bottleneck.cv2, cls)
    return len(bottlenecks)


def _parse_model(d: dict, ch: int, verbose: bool = True) -> tuple[nn.Sequential, list[int]]:
    """``parse_model`` that also builds the blocks of :data:`BLOCKS` and :data:`CSP_BLOCKS`."""
    d = copy.deepcopy(d)
    swaps: dict[int, type[AttnConvBlock]] = {}
    csp_swaps: dict[int, tuple[str, type[AttnConvBlock]]] = {}
    for i, row in enumerate(d["backbone"] + d["head"]):
        if row[2] in BLOCKS:
            swaps[i], row[2] = BLOCKS[row[2]], "Conv"
        elif row[2] in CSP_BLOCKS:
            csp_swaps[i] = (row[2], CSP_BLOCKS[row[2]][1])
            row[2] = CSP_BLOCKS[row[2]][0]
    model, save = _original_parse_model(d, ch, verbose)
    for i, cls in swaps.items():
        old = model[i]
        new = (nn.Sequential(*(_as_block(m, cls) for m in old)) if isinstance(old, nn.Sequential)
               else _as_block(old, cls))
        new.i, new.f = old.i, old.f
        new.type = f"{cls.__module__}.{cls.__name__}"
        new.np = sum(p.numel() for p in new.parameters())
        model[i] = new
        if verbose:
            LOGGER.info(f"attnconv: layer {i} Conv -> {cls.__name__} ({new.np} params)")
    for i, (name, cls) in csp_swaps.items():
        count = _swap_bottleneck_convs(model[i], cls)
        model[i].type = name
        model[i].np = sum(p.numel() for p in model[i].parameters())
        if verbose:
            LOGGER.info(f"attnconv: layer {i} {name}: {count} bottleneck convs -> "
                        f"{cls.__name__} ({model[i].np} params)")
    return model, save


def register() -> None:
    """Make the blocks of :data:`BLOCKS` and :data:`CSP_BLOCKS` usable by name in ultralytics
    model YAMLs (idempotent). Importing :mod:`attnconv.integrations.ultralytics` calls it."""
    global _original_parse_model
    if _original_parse_model is None:
        _original_parse_model = tasks.parse_model
        tasks.parse_model = _parse_model
    for name, cls in BLOCKS.items():
        setattr(tasks, name, cls)
