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

import torch
from torch import nn

from attnconv.layers.helpers import check_conv_input

__all__ = ["AttentionConv2d", "is_attention_conv"]


class AttentionConv2d(nn.Conv2d):
    """An nn.Conv2d whose output also depends on an attention computed from its input.

    Subclasses build their attention modules in ``__init__`` and call
    :meth:`reset_attention` at its end; :meth:`check_input` is the input check every one of
    them runs first in ``forward``.
    """

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
