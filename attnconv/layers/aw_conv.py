"""AW-convolution: an attention map with the shape of the convolution weight.

Zhu, Hofstee, Lee, Al-Ars, "An Attention Module for Convolutional Neural Networks",
ICANN 2021, arXiv:2108.08205. The authors published no code; this is the paper's definition:

    A0  = adaptive_avg_pool2d(x, (kh, kw))                 (N, C_in, kh, kw)
    A   = Pointconv2(relu(Pointconv1(A0)))                 (N, C_out * C_in/g, kh, kw)
    W_n = K * (1 + A_n)                                    F2, the residual edge
    O_n = conv2d(x_n, W_n)

which equals the activation-side form ``O[c2, p] = sum_{c1,t} I[c1, p+t] A[c2, c1, t] K[c2, c1, t]``
of the paper with the residual edge. Pointconv2 starts at zero, so a fresh layer (or one made
by :meth:`AWConv2d.from_conv`) computes exactly the plain convolution.

Three computation paths give the same result; ``impl='auto'`` (default) picks 'chunked' on CPU
once the batch's per-sample kernels outgrow the cache (more than 8 MiB) and 'grouped' otherwise:

* ``impl='chunked'``: :func:`attnconv.functional.aw.aw_conv2d`. The batch is cut into
  chunks; each chunk's kernels are built right before its conv (the chunk folded into the conv
  groups) while they are in cache, and built again in backward instead of being stored. Chunks
  are sized to the cache on CPU and are the whole batch on GPUs (``chunk_size`` overrides).
* ``impl='grouped'``: the whole batch folded into the conv groups, one conv call for all
  per-sample kernels, differentiated by plain autograd (which stores every kernel).
* ``impl='unfold'``: im2col + batched matmul, with no batch size baked into any op, so ONNX
  and ``torch.export`` graphs keep a dynamic batch. Used automatically while exporting.

No path materialises anything of size N x C_out x C_in x H x W. All three give exact second
derivatives (the chunked one by differentiating the grouped formulation when a backward is
recorded with ``create_graph=True``). Under ``torch.autocast`` the kernels are built in the
autocast dtype. The paths are functions of :mod:`attnconv.functional.aw`.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.common_types import _size_2_t

from attnconv.functional.aw import (
    CPU_BATCH_BYTES,
    aw_conv2d,
    aw_conv2d_grouped,
    aw_conv2d_unfold,
    aw_kernels,
)
from attnconv.layers.base import AttentionConv2d
from attnconv.layers.helpers import check_conv_args, check_positive, is_exporting

Impl = Literal["auto", "chunked", "grouped", "unfold"]
IMPLS: tuple[str, ...] = ("auto", "chunked", "grouped", "unfold")

#: Pointconv1's width R. Pointconv2 costs (R + 1) * C_out * C_in/g parameters, so R = 4 keeps a
#: ResNet-50 with AW in every bottleneck 3x3 conv at +24.7% parameters (spec: at most ~25%).
DEFAULT_ATTN_CHANNELS = 4


class AWConv2d(AttentionConv2d):
    """Conv2d whose weight is attended per sample: ``W_n = K * (1 + A(x_n))`` (AW, Eq. F1/F2).

    Takes nn.Conv2d's arguments in nn.Conv2d's order and keeps its ``weight`` / ``bias``, plus
    ``attn_channels`` (R, the width between Pointconv1 and Pointconv2), ``impl`` (see the
    module docstring) and ``chunk_size`` (samples per chunk of ``impl='chunked'``; ``None``:
    sized to the cache on CPU, the whole batch on GPUs).
    """

    IMPLS = IMPLS

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
        attn_channels: int = DEFAULT_ATTN_CHANNELS,
        impl: Impl = "auto",
        chunk_size: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        check_conv_args(type(self).__name__, in_channels=in_channels, out_channels=out_channels,
                        kernel_size=kernel_size, stride=stride, padding=padding,
                        dilation=dilation, groups=groups)
        check_positive(type(self).__name__, attn_channels=attn_channels)
        if chunk_size is not None:
            check_positive(type(self).__name__, chunk_size=chunk_size)
        self.check_impl(impl)
        try:
            super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                             groups, bias, padding_mode, device=device, dtype=dtype)
        except ValueError as err:
            raise ValueError(f"{type(self).__name__}: {err}") from None
        self.attn_channels = attn_channels
        self.impl: Impl = impl
        self.chunk_size = chunk_size
        factory = {"device": device, "dtype": dtype}
        self.pointconv1 = nn.Conv2d(in_channels, attn_channels, 1, **factory)
        self.pointconv2 = nn.Conv2d(attn_channels, out_channels * (in_channels // groups), 1,
                                    **factory)
        self.reset_attention()

    def reset_attention(self) -> None:
        """Zero Pointconv2 so that A = 0 and the layer is the plain conv with its weight.

        Network constructors that re-initialise every nn.Conv2d (torchvision's and timm's ResNets
        do) undo this; call it again after them.
        """
        nn.init.zeros_(self.pointconv2.weight)
        nn.init.zeros_(self.pointconv2.bias)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, **kwargs) -> AWConv2d:
        """An AWConv2d with ``conv``'s geometry, weight and bias; its output equals ``conv``'s."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"{cls.__name__}.from_conv expects an nn.Conv2d, got "
                            f"{type(conv).__name__}")
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                    conv.padding, conv.dilation, conv.groups, conv.bias is not None,
                    conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype,
                    **kwargs)
        with torch.no_grad():
            layer.weight.copy_(conv.weight)
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        return layer.train(conv.training)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample attention A of shape (N, C_out, C_in/groups, kh, kw) (AW, F1)."""
        self.check_input(x)
        attn = self.pointconv2(self._hidden(x))
        return attn.view(x.shape[0], *self.weight.shape)

    def _hidden(self, x: torch.Tensor) -> torch.Tensor:
        """H = relu(Pointconv1(avgpool(x))), (N, R, kh, kw): all the chunked path keeps of A."""
        return F.relu(self.pointconv1(F.adaptive_avg_pool2d(x, self.kernel_size)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        if x.shape[0] == 0:
            return self._conv_forward(x, self.weight, self.bias)
        impl = self.resolved_impl(x)
        if impl == "chunked":
            return self._forward_chunked(x)
        kernels = aw_kernels(self.weight, self.attention(x))  # K * (1 + A)
        if impl == "unfold":
            if any(self._reversed_padding_repeated_twice):
                mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
                x = F.pad(x, self._reversed_padding_repeated_twice, mode=mode)
            return aw_conv2d_unfold(x, kernels, self.bias, self.stride, self.dilation,
                                    self.groups)
        padding = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = (0, 0)
        return aw_conv2d_grouped(x, kernels, self.bias, self.stride, padding, self.dilation,
                                 self.groups)

    def resolved_impl(self, x: torch.Tensor) -> str:
        """The path :meth:`forward` takes for ``x``: ``impl``, with 'auto' and export resolved."""
        if is_exporting():
            return "unfold"
        if self.impl != "auto":
            return self.impl
        # Measured on CPU: once the batch's kernels outgrow the cache, building them chunk by
        # chunk wins (4.5x -> 2.1x nn.Conv2d at (32, 256, 14, 14)); while they fit, the one-call
        # grouped conv is as fast or faster. GPUs: one call, and the one-call path.
        kernel_bytes = x.shape[0] * self.weight.numel() * self.weight.element_size()
        return "chunked" if x.device.type == "cpu" and kernel_bytes > CPU_BATCH_BYTES \
            else "grouped"

    def _forward_chunked(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self._hidden(x)
        # The chunked conv takes symmetric integer padding only (its backward calls
        # convolution_backward); other paddings are applied to x here, where autograd sees them.
        left, right, top, bottom = self._reversed_padding_repeated_twice
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = (0, 0)
        elif left != right or top != bottom:
            x = F.pad(x, self._reversed_padding_repeated_twice)
            padding = (0, 0)
        else:
            padding = (top, left)
        return aw_conv2d(x, hidden, self.weight, self.pointconv2.weight, self.pointconv2.bias,
                         self.bias, self.stride, padding, self.dilation, self.groups,
                         self.chunk_size)

    def extra_repr(self) -> str:
        chunk = "" if self.chunk_size is None else f", chunk_size={self.chunk_size}"
        return (f"{super().extra_repr()}, attn_channels={self.attn_channels}, "
                f"impl={self.impl!r}{chunk}")
