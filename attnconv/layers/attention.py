"""Activation-attention baselines (SE, CBAM, CAM, CA, ECA) with their papers' defaults, and
the RFAConv paper's "attention, then conv" baseline rows (CAMConv, CBAMConv, CAConv).

Every attention here is timm's layer (``timm.layers``) with the arguments that make it the
paper's definition; none is rewritten. Each class says which timm layer it is and where its
definition differs from the paper.

* SE   Hu et al., "Squeeze-and-Excitation Networks", CVPR 2018, arXiv:1709.01507.
* CBAM Woo et al., "CBAM: Convolutional Block Attention Module", ECCV 2018, arXiv:1807.06521.
* CA   Hou et al., "Coordinate Attention for Efficient Mobile Network Design", CVPR 2021,
       arXiv:2103.02907.
* ECA  Wang et al., "ECA-Net: Efficient Channel Attention ...", CVPR 2020, arXiv:1910.03151.
* CAMConv / CBAMConv / CAConv: Zhang et al. 2023 (RFAConv), arXiv:2304.03198, Table 1: the
  attention applied to the conv's input, then a standard conv (:class:`AttnConv2d`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from timm.layers.cbam import CbamModule, ChannelAttn
from timm.layers.coord_attn import CoordAttn
from timm.layers.eca import EcaModule
from timm.layers.squeeze_excite import SEModule
from torch import nn
from torch.nn.common_types import _size_2_t

from attnconv.layers.base import AttentionConv2d
from attnconv.layers.helpers import check_conv_args, check_conv_input, check_positive, lookup

__all__ = ["ATTN_LAYERS", "CAM", "CBAM", "ECA", "SE", "AttnConv2d", "CoordAttention", "get_attn"]

AttnFactory = Callable[..., nn.Module]


class SE(SEModule):
    """Squeeze-and-excitation (Hu et al. 2018): ``x * sigmoid(W2 relu(W1 mean_hw(x) + b1) + b2)``
    with hidden width C // reduction (r = 16).

    timm's ``SEModule`` with ``rd_channels = max(1, C // reduction)``; its default would round
    the width up to a multiple of 8 (8 instead of the paper's 4 at C = 64).
    """

    def __init__(
        self,
        channels: int,
        reduction: int = 16,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        check_positive(type(self).__name__, channels=channels, reduction=reduction)
        super().__init__(channels, rd_channels=max(1, channels // reduction), device=device,
                         dtype=dtype)


class CAM(ChannelAttn):
    """CBAM's channel attention (Woo et al. 2018, Eq. 2):
    ``x * sigmoid(MLP(avgpool(x)) + MLP(maxpool(x)))``, shared MLP C -> C // r -> C, r = 16,
    ReLU between, no biases (as the paper's equation; the official CBAM code has biases).

    timm's ``ChannelAttn`` with the paper's reduction.
    """

    def __init__(
        self,
        channels: int,
        reduction: int = 16,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        check_positive(type(self).__name__, channels=channels, reduction=reduction)
        super().__init__(channels, rd_channels=max(1, channels // reduction), device=device,
                         dtype=dtype)


class CBAM(CbamModule):
    """CBAM (Woo et al. 2018): :class:`CAM`, then spatial attention
    ``x * sigmoid(BN(conv7x7([mean_c x; max_c x])))``.

    timm's ``CbamModule``. Deviation from the paper's Eq. 3, kept as in the official CBAM code:
    the 7x7 conv (no bias) is followed by a BatchNorm.
    """

    def __init__(
        self,
        channels: int,
        reduction: int = 16,
        spatial_kernel_size: int = 7,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        check_positive(type(self).__name__, channels=channels, reduction=reduction,
                       spatial_kernel_size=spatial_kernel_size)
        super().__init__(channels, rd_channels=max(1, channels // reduction),
                         spatial_kernel_size=spatial_kernel_size, device=device, dtype=dtype)


class CoordAttention(CoordAttn):
    """Coordinate attention (Hou et al. 2021): pool along W and along H, shared
    conv1x1 (C -> mip, bias) + BN + h_swish, then ``x * sigmoid(conv_h(.)) * sigmoid(conv_w(.))``
    with mip = max(8, C // reduction), reduction = 32, as in the official code.

    timm's ``CoordAttn`` with the paper's width, biases and h_swish (timm's defaults differ:
    width from ``rd_ratio * se_factor`` rounded to 8, convs without bias).
    """

    def __init__(
        self,
        channels: int,
        reduction: int = 32,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        check_positive(type(self).__name__, channels=channels, reduction=reduction)
        super().__init__(channels, rd_channels=max(8, channels // reduction), bias=True,
                         act_layer=nn.Hardswish, norm_layer=nn.BatchNorm2d, device=device,
                         dtype=dtype)


class ECA(EcaModule):
    """Efficient channel attention (Wang et al. 2020): ``x * sigmoid(conv1d_k(mean_hw(x)))``
    across channels, no bias, k = |log2(C) / gamma + beta / gamma| rounded up to odd.

    timm's ``EcaModule``. Deviation: timm never lets k drop below 3 (the formula gives 1 for
    C < 8).
    """

    def __init__(
        self,
        channels: int,
        gamma: float = 2,
        beta: float = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        check_positive(type(self).__name__, channels=channels)
        super().__init__(channels, gamma=gamma, beta=beta, device=device, dtype=dtype)
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # timm's conv1d runs across channels whatever their number: check it here.
        check_conv_input(self, x, self.channels)
        return super().forward(x)

    def extra_repr(self) -> str:
        return f"{self.channels}"


#: name -> callable taking the channel count (timm's ``attn_layer(channels)`` slot).
ATTN_LAYERS: dict[str, AttnFactory] = {
    "se": SE,
    "cbam": CBAM,
    "cam": CAM,
    "ca": CoordAttention,
    "eca": ECA,
}


def get_attn(name: str) -> AttnFactory:
    """The attention class registered under ``name`` (see :data:`ATTN_LAYERS`); it takes the
    channel count, so it fits timm's ``attn_layer`` argument."""
    return lookup("attention layer", ATTN_LAYERS, name)


class AttnConv2d(AttentionConv2d):
    """An activation attention on the input, then a standard conv: ``conv(attn(x))``.

    The RFAConv paper's baseline rows CAMConv (``attn_layer='cam'``), CBAMConv (``'cbam'``)
    and CAConv (``'ca'``). Takes nn.Conv2d's arguments and keeps its ``weight`` / ``bias``;
    ``attn_layer`` is a name of :data:`ATTN_LAYERS` or a callable taking the channel count.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _size_2_t,
        stride: _size_2_t = 1,
        padding: _size_2_t | str = 0,
        dilation: _size_2_t = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        attn_layer: str | Callable[..., nn.Module] = "cam",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        check_conv_args(type(self).__name__, in_channels=in_channels, out_channels=out_channels,
                        kernel_size=kernel_size, stride=stride, padding=padding,
                        dilation=dilation, groups=groups)
        try:
            super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                             groups, bias, padding_mode, device=device, dtype=dtype)
        except ValueError as err:
            raise ValueError(f"{type(self).__name__}: {err}") from None
        self.attn_name = attn_layer if isinstance(attn_layer, str) else getattr(
            attn_layer, "__name__", type(attn_layer).__name__)
        factory = get_attn(attn_layer) if isinstance(attn_layer, str) else attn_layer
        self.attn = factory(in_channels, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return super().forward(self.attn(x))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, attn_layer={self.attn_name!r}"
