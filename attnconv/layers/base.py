"""The base class of every attention conv in attnconv.

An attention conv is an ``nn.Conv2d`` (nn.Conv2d's arguments in nn.Conv2d's order, its
``weight`` / ``bias`` and geometry attributes) whose output also depends on an attention
computed from the input: AW-convolution (Zhu et al., ICANN 2021, arXiv:2108.08205) attends the
weight, the RFA family (Zhang et al. 2023, arXiv:2304.03198) the receptive field, and
:class:`attnconv.layers.attention.AttnConv2d` the activations after a plain conv.

The rest of the package asks :func:`is_attention_conv` (conversion, pretrained starts,
profiling, figures) instead of listing the classes, so a new layer is one file that subclasses
:class:`AttentionConv2d` plus one line in the ``CONV_LAYERS`` registry.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from attnconv.layers.helpers import check_conv_input

__all__ = ["AttentionConv2d", "is_attention_conv", "set_impl", "use_impl"]


class AttentionConv2d(nn.Conv2d):
    """An nn.Conv2d whose output also depends on an attention computed from its input.

    Subclasses build their attention modules in ``__init__`` and call
    :meth:`reset_attention` at its end; :meth:`check_input` is the input check every one of
    them runs first in ``forward``. A layer with several computation paths lists them in
    ``IMPLS`` ("auto" first: the path picked per input) and keeps its choice in ``impl``, set
    through :meth:`check_impl` at construction and by :func:`set_impl` / :func:`use_impl`.
    """

    #: the computation paths ``impl`` may name (all give the same result)
    IMPLS: tuple[str, ...] = ()

    def check_impl(self, impl: object) -> str:
        """``impl`` when it is one of ``IMPLS``, else a one-line ValueError naming them."""
        if not isinstance(impl, str) or impl not in self.IMPLS:
            raise ValueError(f"{type(self).__name__}: impl must be one of {self.IMPLS}, "
                             f"got {impl!r}")
        return impl

    def reset_attention(self) -> None:
        """Put the attention in its starting state (the one the paper's networks begin from).

        Network constructors that re-initialise every nn.Conv2d (timm's and torchvision's
        ResNets do) overwrite the attention's own sub-convs too; they call this afterwards.
        The default keeps the initialisation the sub-modules were built with.
        """

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a one-line error unless ``x`` is a floating-point (N, in_channels, H, W)
        tensor, as nn.Conv2d refuses integer and bool inputs."""
        check_conv_input(self, x, self.in_channels)


def is_attention_conv(module: nn.Module) -> bool:
    """Whether ``module`` is one of attnconv's attention convs."""
    return isinstance(module, AttentionConv2d)


def _offering(model: nn.Module, impl: str) -> list[AttentionConv2d]:
    """The attention convs of ``model`` (itself included) that offer ``impl``; ValueError when
    no attention conv class offers it at all."""
    offered = {name for cls in _subclasses(AttentionConv2d) for name in cls.IMPLS}
    if impl not in offered:
        raise ValueError(f"impl must be one of {tuple(sorted(offered))}, got {impl!r}")
    return [m for m in model.modules() if is_attention_conv(m) and impl in m.IMPLS]


def _subclasses(cls: type) -> set[type]:
    found = set(cls.__subclasses__())
    for sub in list(found):
        found |= _subclasses(sub)
    return found


def set_impl(model: nn.Module, impl: str) -> int:
    """Set ``impl`` on every attention conv in ``model`` that offers it (RFA layers: "auto",
    "eager", "fused"; AW layers: "auto", "chunked", "grouped", "unfold"); returns how many."""
    layers = _offering(model, impl)
    for layer in layers:
        layer.impl = impl
    return len(layers)


@contextlib.contextmanager
def use_impl(model: nn.Module, impl: str) -> Iterator[nn.Module]:
    """:func:`set_impl` for the duration of a ``with`` block; the layers' own choices come
    back afterwards (e.g. ``use_impl(model, "eager")`` for torch's FlopCounterMode, which
    cannot see inside the fused RFA operators)."""
    layers = _offering(model, impl)
    previous = [layer.impl for layer in layers]
    try:
        for layer in layers:
            layer.impl = impl
        yield model
    finally:
        for layer, old in zip(layers, previous, strict=True):
            layer.impl = old
