"""Receptive-field attention convolutions: RFAConv, RFCBAMConv, RFCAConv.

Zhang et al., "RFAConv: Innovating Spatial Attention and Standard Convolutional Operation",
2023, arXiv:2304.03198; official code Liuchen1997/RFAConv. With x (N, C, H, W), odd kernel k,
k2 = k * k taps, stride s:

    g[c, t] = ReLU(BN(depthwise_k(x)))[c * k2 + t]         (N, C, k2, H', W'), stride s
    RFAConv:    A[c, t] = softmax_t(a[c, t] * avgpool_k,s(x)[c])
    RFCBAMConv: A[c, t] = SE(x)[c] * sigmoid(conv3x3([max_c g; mean_c g] on the k x k tiles))[t]
    RFCAConv:   A[c, t] = coordinate attention of g on the k x k tiles
    out = conv_{k, stride k}(rearrange(g * A))  ==  conv_1x1(g * A, W.reshape(O, C * k2)) + b

The official code rearranges g * A into an (H'k, W'k) map and convolves it with kernel k and
stride k; a stride-k conv over non-overlapping k x k tiles is exactly the 1x1 conv above, so
these layers never build the rearranged map. RFCBAM's 3x3 spatial conv and RFCA's pooling do
depend on the tile layout; they run on rearranged *pooled* maps (2 or C channels of one row or
column), never on a rearranged copy of g.

The module owns its parameters and hands them, as they are, to the functions of
:mod:`attnconv.functional.rfa` (``rfa_conv2d``, ``rfa_tile_conv2d``), which run either the fused
C++ operators of :mod:`attnconv.ops` (CPU, every core; training keeps about the input for
backward) or the eager formulation (any device, export, second derivatives; eval folds the
BatchNorm into the depthwise conv, training keeps only the depthwise conv's output). RFCBAM
and RFCA compute their attention in one place, :meth:`_factors`, from small reductions of the
features, on both paths. ``impl="auto"`` takes, per layer and mode, the path measured faster
on CPU (``_auto_fused``; benchmarks/RESULTS.md).

Deviations from the official code, all deliberate:

* The layers end at the convolution: no BatchNorm/ReLU after it (the ``model.py`` copies add
  them; :meth:`load_official_state_dict` hands their entries back to the caller).
* Even kernels (wrong output size officially), padding other than k // 2, dilation != 1 and
  groups != 1 (accepted and ignored or mis-padded officially) raise ValueError.
* One class per layer under the names the papers use (``model.py`` has two ``RFAConv``
  classes, a ``nn.ReLu`` typo, and the ResNet files call ``RFACBAMConv``/``RFACAConv``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.common_types import _size_2_t
from torch.nn.modules.utils import _pair

from attnconv.functional.rfa import (
    rfa_conv2d,
    rfa_tile_attention,
    rfa_tile_conv2d,
    to_tiles,
)
from attnconv.layers.base import AttentionConv2d
from attnconv.layers.helpers import check_conv_args, check_positive, layer_name
from attnconv.ops.rfa import RFA_IMPLS, _out_size, use_fused

__all__ = ["RFAConv2d", "RFCAConv2d", "RFCBAMConv2d"]


# --- the layers ------------------------------------------------------------------------------

class _ReceptiveFieldConv2d(AttentionConv2d):
    """Shared part: argument checks, the depthwise feature conv + BN, the final conv's weight.

    The module is an nn.Conv2d whose ``weight`` (O, C, k, k) and ``bias`` are the final
    conv's; its stride/padding attributes describe the output geometry (that of
    nn.Conv2d(k, stride, padding=k // 2)).
    """

    #: the official module's key prefix of the depthwise conv + BN ("generate_feature" / "generate")
    _official_feature_prefix = "generate"

    #: whether ``impl="auto"`` runs the fused kernels on CPU (in eval, in training): yes where
    #: interleaved measurements of both paths found them faster at (8, 64, 56, 56) stride 1
    #: and (32, 128, 28, 28) stride 2 on 2 threads (benchmarks/RESULTS.md)
    _auto_fused: tuple[bool, bool] = (True, True)  # (eval, training)
    IMPLS = RFA_IMPLS

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _size_2_t = 3,
        stride: _size_2_t = 1,
        padding: _size_2_t | None = None,
        dilation: _size_2_t = 1,
        groups: int = 1,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        name = type(self).__name__
        check_conv_args(name, in_channels=in_channels, out_channels=out_channels,
                        kernel_size=kernel_size, stride=stride, padding=padding,
                        dilation=dilation, groups=groups, padding_none=True)
        kh, kw = _pair(kernel_size)
        if kh != kw or kh % 2 == 0:
            raise ValueError(f"{name}: kernel_size must be odd and square (the k x k receptive "
                             f"field is centred on each output position), got {kernel_size!r}")
        k = kh
        if padding is not None and _pair(padding) != (k // 2, k // 2):
            raise ValueError(f"{name}: padding must be None or kernel_size // 2 = {k // 2} (the "
                             f"only geometry the method defines), got {padding!r}")
        if _pair(dilation) != (1, 1):
            raise ValueError(f"{name}: dilation must be 1 (the official code accepts it and "
                             f"ignores it), got {dilation!r}")
        if groups != 1:
            raise ValueError(f"{name}: groups must be 1, got {groups!r}")
        super().__init__(in_channels, out_channels, k, stride, k // 2, bias=bias,
                         device=device, dtype=dtype)
        factory = {"device": device, "dtype": dtype}
        self.taps = k * k
        self.feature_conv = nn.Conv2d(in_channels, in_channels * self.taps, k, stride, k // 2,
                                      groups=in_channels, bias=False, **factory)
        self.feature_bn = nn.BatchNorm2d(in_channels * self.taps, **factory)

    # -- what the functions of attnconv.functional.rfa take --

    def _bn_args(self, update_stats: bool = True) -> dict:
        """The BatchNorm's tensors and mode as nn.BatchNorm2d hands them to F.batch_norm
        (counting the batch when it updates the running statistics; ``update_stats=False``,
        as for an empty batch, leaves them alone)."""
        bn = self.feature_bn
        momentum = 0.0 if bn.momentum is None else bn.momentum
        update = update_stats and self.training and bn.track_running_stats
        if update and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            if bn.momentum is None:
                momentum = 1.0 / float(bn.num_batches_tracked)
        training = self.training or bn.running_mean is None
        running = not training or update
        return {"bn_weight": bn.weight, "bn_bias": bn.bias,
                "running_mean": bn.running_mean if running else None,
                "running_var": bn.running_var if running else None,
                "training": training, "momentum": momentum, "eps": bn.eps}

    def _check_batch(self, x: torch.Tensor) -> None:
        """BatchNorm's refusal of a single value per channel in training, in one line."""
        k, s = self.kernel_size[0], self.stride[0]
        count = x.shape[0] * _out_size(x.shape[2], k, s) * _out_size(x.shape[3], k, s)
        if self.training and 0 < count < 2:
            raise ValueError(f"{layer_name(self)}: expected more than 1 value per channel when "
                             f"training (BatchNorm), got input {tuple(x.shape)}")

    def _runs_fused(self, x: torch.Tensor) -> bool:
        # An empty batch takes the eager path, which answers an empty batch as BatchNorm does.
        return x.shape[0] > 0 and use_fused(type(self).__name__, self.impl, x,
                                            self._auto_fused[self.training])

    def _check_input(self, x: torch.Tensor) -> None:
        self.check_input(x)
        self._check_batch(x)

    # -- importing the official modules' parameters --

    def official_keys(self) -> dict[str, tuple[torch.Tensor, tuple[int, ...]]]:
        """official key -> (this layer's tensor, the official shape): what
        :meth:`load_official_state_dict` fills from an official module's state dict."""
        c, k2, k = self.in_channels, self.taps, self.kernel_size[0]
        p = self._official_feature_prefix
        keys = {
            f"{p}.0.weight": (self.feature_conv.weight, (c * k2, 1, k, k)),
            "conv.0.weight": (self.weight, tuple(self.weight.shape)),
        }
        for name in ("weight", "bias", "running_mean", "running_var"):
            keys[f"{p}.1.{name}"] = (getattr(self.feature_bn, name), (c * k2,))
        if self.bias is not None:
            keys["conv.0.bias"] = (self.bias, (self.out_channels,))
        return keys

    @torch.no_grad()
    def load_official_state_dict(self, state_dict: dict[str, torch.Tensor]
                                 ) -> dict[str, torch.Tensor]:
        """Copy the parameters and buffers of the official module's ``state_dict()`` into this
        layer (the ``classification/RF*resnet.py`` layout, or the ``model.py`` one with a
        BatchNorm2d + ReLU after the final conv).

        Returns the entries this layer has no place for, the ``model.py`` trailing BatchNorm's
        ``conv.1.*`` (empty for the classification layout); apply them after the layer to get
        the official module's output. Missing, mis-shaped or unknown keys raise a ValueError
        naming them.
        """
        keys = self.official_keys()
        bn_prefix = f"{self._official_feature_prefix}.1."
        trailing = {k: v for k, v in state_dict.items() if k.startswith("conv.1.")}
        optional = {f"{bn_prefix}num_batches_tracked"}
        missing = sorted(set(keys) - set(state_dict))
        unknown = sorted(set(state_dict) - set(keys) - set(trailing) - optional)
        wrong = sorted(f"{k}: expected {shape}, got {tuple(state_dict[k].shape)}"
                       for k, (_, shape) in keys.items()
                       if k in state_dict and tuple(state_dict[k].shape) != shape)
        problems = [f"missing keys {missing}"] * bool(missing)
        problems += [f"unexpected keys {unknown}"] * bool(unknown)
        problems += [f"mis-shaped keys [{'; '.join(wrong)}]"] * bool(wrong)
        if problems:
            raise ValueError(f"{layer_name(self)}.load_official_state_dict: "
                             + ", ".join(problems))
        for key, (target, _) in keys.items():
            target.copy_(state_dict[key].reshape(target.shape))
        tracked = state_dict.get(f"{bn_prefix}num_batches_tracked")
        if tracked is not None:
            self.feature_bn.num_batches_tracked.copy_(tracked)
        return trailing

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size[0]}, "
                f"stride={self.stride}, bias={self.bias is not None}")


class RFAConv2d(_ReceptiveFieldConv2d):
    """Receptive-field attention conv (Zhang et al. 2023, arXiv:2304.03198, the grouped RFAConv):

        out = conv_1x1(ReLU(BN(dwconv(x)))[c, t] * softmax_t(a[c, t] * avgpool(x)[c]),
                       weight.reshape(O, C * k2)) + bias

    Takes nn.Conv2d's arguments (``padding=None`` means k // 2, the only one allowed) and
    keeps ``weight`` (O, C, k, k) / ``bias`` of the final conv. ``attn_logit_scale`` (C, k2)
    holds the official ``get_weight.1.weight``.

    ``impl``: "fused" runs the fused C++ kernels (:mod:`attnconv.ops`, built by ``make`` or
    on first use) on CPU, "eager" the eager formulation (:mod:`attnconv.functional.rfa`),
    "auto" (the default) on CPU the path measured faster for the layer and mode
    (``_auto_fused``), on other devices eager (see also :func:`attnconv.layers.set_impl`).
    Where "fused" cannot run (CUDA, no compiler) the layer runs eager and warns once with the
    reason.
    """

    _official_feature_prefix = "generate_feature"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _size_2_t = 3,
        stride: _size_2_t = 1,
        padding: _size_2_t | None = None,
        dilation: _size_2_t = 1,
        groups: int = 1,
        bias: bool = True,
        impl: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.check_impl(impl)
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias, device=device, dtype=dtype)
        self.impl = impl
        self.attn_logit_scale = nn.Parameter(
            torch.empty(in_channels, self.taps, device=device, dtype=dtype))
        # the official grouped 1x1 conv's default init: fan-in 1 -> U(-1, 1)
        nn.init.uniform_(self.attn_logit_scale, -1.0, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return rfa_conv2d(x, self.feature_conv.weight, **self._bn_args(x.shape[0] > 0),
                          logit_scale=self.attn_logit_scale, weight=self.weight, bias=self.bias,
                          stride=self.stride[0], fused=self._runs_fused(x))

    def reset_attention(self) -> None:
        """The official RFA ResNets' start: ``attn_logit_scale`` (there the grouped 1x1 conv
        ``get_weight.1``, fan-out C * k2) Kaiming-normal, a near-uniform softmax. A layer built
        on its own keeps the official module's default U(-1, 1) instead."""
        nn.init.normal_(self.attn_logit_scale, std=math.sqrt(2.0 / self.attn_logit_scale.numel()))

    def receptive_field_attention(self, x: torch.Tensor) -> torch.Tensor:
        """softmax_t(a[c, t] * avgpool(x)[c]): the weights of the k2 receptive-field members of
        every output position, (N, C, k2, H', W') (for inspection and figures)."""
        self.check_input(x)
        pooled = F.avg_pool2d(x, self.kernel_size, self.stride, self.padding,
                              count_include_pad=True)
        return torch.softmax(pooled.unsqueeze(2) * self.attn_logit_scale[..., None, None], dim=2)

    def official_keys(self):
        keys = super().official_keys()
        keys["get_weight.1.weight"] = (self.attn_logit_scale,
                                       (self.in_channels * self.taps, 1, 1, 1))
        return keys


class _TileAttentionConv2d(_ReceptiveFieldConv2d):
    """RFCBAM/RFCA: g = ReLU(BN(dwconv(x))), an attention (f1, f2) computed from small
    reductions of g (and x), then conv_1x1(g * f1 * f2). Subclasses define :meth:`_factors`.

    ``impl`` as in :class:`RFAConv2d`; the fused path is :mod:`attnconv.ops.rfa_tile`.
    """

    #: the attention kind of the fused tile ops (0 RFCBAM, 1 RFCA)
    _tile_kind: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return rfa_tile_conv2d(x, self.feature_conv.weight, **self._bn_args(x.shape[0] > 0),
                               factors=self._factors, weight=self.weight, bias=self.bias,
                               stride=self.stride[0], kind=self._tile_kind,
                               fused=self._runs_fused(x))

    def _factors(self, x: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor,
                 update_stats: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention's two factors from the reductions of the features
        (:func:`attnconv.functional.rfa.tile_reductions`): the one place the layer's attention
        is computed, on the fused and the eager path alike."""
        raise NotImplementedError

    def receptive_field_attention(self, x: torch.Tensor) -> torch.Tensor:
        """The attention multiplied onto the receptive-field features g (channel x spatial for
        RFCBAM, a_h x a_w for RFCA), (N, C, k2, H', W') (for inspection and figures). The
        running statistics are left as they are, in training mode too."""
        self.check_input(x)
        bn = self._bn_args(update_stats=False)
        return rfa_tile_attention(
            x, self.feature_conv.weight, bn["bn_weight"], bn["bn_bias"], bn["running_mean"],
            bn["running_var"], lambda x, r1, r2: self._factors(x, r1, r2, update_stats=False),
            self.stride[0], self._tile_kind, bn["training"], bn["eps"])


class RFCBAMConv2d(_TileAttentionConv2d):
    """RFAConv with CBAM-style attention (Zhang et al. 2023, arXiv:2304.03198, RFCBAMConv):

        g  = ReLU(BN(dwconv(x)))                                   (N, C, k2, H', W')
        ca = sigmoid(fc2(ReLU(fc1(mean_hw(x)))))                    (N, C), hidden width 16
        sa = sigmoid(conv3x3([max_c g; mean_c g] on the (H'k, W'k) tiles))
        out = conv_1x1(g * ca * sa, weight.reshape(O, C * k2)) + bias

    The 3x3 spatial conv crosses tile borders as in the official code; it runs on the
    rearranged 2-channel map only. ``hidden_channels`` is the official SE's width (16 whatever
    C is; the official argument is called a ratio but used as a width).
    """

    _tile_kind = 0

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _size_2_t = 3,
        stride: _size_2_t = 1,
        padding: _size_2_t | None = None,
        dilation: _size_2_t = 1,
        groups: int = 1,
        bias: bool = True,
        hidden_channels: int = 16,
        impl: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        check_positive(type(self).__name__, hidden_channels=hidden_channels)
        self.check_impl(impl)
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias, device=device, dtype=dtype)
        factory = {"device": device, "dtype": dtype}
        self.impl = impl
        self.hidden_channels = hidden_channels
        self.channel_fc1 = nn.Linear(in_channels, hidden_channels, bias=False, **factory)
        self.channel_fc2 = nn.Linear(hidden_channels, in_channels, bias=False, **factory)
        self.spatial_conv = nn.Conv2d(2, 1, 3, padding=1, bias=False, **factory)

    def _factors(self, x, r1, r2, update_stats=True):
        """The channel gate (N, C) and the spatial gate (N, H', W', k2) from the max and mean
        over channels (N, H', W', k2)."""
        n, h, w, k2 = r1.shape
        k = self.kernel_size[0]
        pdtype = self.channel_fc1.weight.dtype
        channel = torch.sigmoid(self.channel_fc2(F.relu(self.channel_fc1(
            x.mean((2, 3)).to(pdtype)))))
        pooled = torch.stack([r1, r2], dim=1).permute(0, 1, 4, 2, 3)  # (N, 2, k2, H', W')
        # the 3x3 conv crosses tile borders as in the official code: on the rearranged map
        spatial = torch.sigmoid(self.spatial_conv(to_tiles(pooled.to(pdtype), k)))
        # (N, 1, H'k, W'k) -> (N, H', W', k2)
        spatial = spatial.view(n, h, k, w, k).permute(0, 1, 3, 2, 4).reshape(n, h, w, k2)
        return channel, spatial

    def official_keys(self):
        keys = super().official_keys()
        c, r = self.in_channels, self.hidden_channels
        keys["se.fc.0.weight"] = (self.channel_fc1.weight, (r, c))
        keys["se.fc.2.weight"] = (self.channel_fc2.weight, (c, r))
        keys["get_weight.0.weight"] = (self.spatial_conv.weight, (1, 2, 3, 3))
        return keys

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, hidden_channels={self.hidden_channels}"


class RFCAConv2d(_TileAttentionConv2d):
    """RFAConv with coordinate attention (Zhang et al. 2023, arXiv:2304.03198, RFCAConv; CA:
    Hou et al., CVPR 2021, arXiv:2103.02907) on the (H'k, W'k) tiles of g:

        g = ReLU(BN(dwconv(x))) rearranged;  y = h_swish(BN(conv1([mean_w g; mean_h g])))
        a_h = sigmoid(conv_h(y_h)), a_w = sigmoid(conv_w(y_w)), mip = max(8, C // reduction)
        out = conv_1x1(g * a_h * a_w, weight.reshape(O, C * k2)) + bias

    The row and column means are taken on g in tap layout (N, C, k, k, H', W'), so only the
    pooled (N, C, H'k) and (N, C, W'k) maps are ever in the rearranged order.
    """

    _tile_kind = 1

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _size_2_t = 3,
        stride: _size_2_t = 1,
        padding: _size_2_t | None = None,
        dilation: _size_2_t = 1,
        groups: int = 1,
        bias: bool = True,
        reduction: int = 32,
        impl: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        check_positive(type(self).__name__, reduction=reduction)
        self.check_impl(impl)
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias, device=device, dtype=dtype)
        factory = {"device": device, "dtype": dtype}
        self.impl = impl
        self.reduction = reduction
        mip = max(8, in_channels // reduction)
        self.coord_conv = nn.Conv2d(in_channels, mip, 1, **factory)
        self.coord_bn = nn.BatchNorm2d(mip, **factory)
        self.coord_conv_h = nn.Conv2d(mip, in_channels, 1, **factory)
        self.coord_conv_w = nn.Conv2d(mip, in_channels, 1, **factory)

    def _factors(self, x, r1, r2, update_stats=True):
        """a_h (N, H', k, C) and a_w (N, W', k, C) from the row and column means of g; rows of
        the rearranged map are h' * k + i, columns w' * k + j."""
        n, h, k, c = r1.shape
        w = r2.shape[1]
        pdtype = self.coord_conv.weight.dtype
        rows = r1.permute(0, 3, 1, 2).reshape(n, c, h * k, 1)
        cols = r2.permute(0, 3, 1, 2).reshape(n, c, w * k, 1)
        y = self.coord_conv(torch.cat([rows, cols], dim=2).to(pdtype))
        bn = self.coord_bn
        if update_stats or not bn.training:
            y = bn(y)
        else:  # batch statistics, as bn(y) in training, without touching the running ones
            y = F.batch_norm(y, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
        y_h, y_w = torch.split(F.hardswish(y), [h * k, w * k], dim=2)
        a_h = torch.sigmoid(self.coord_conv_h(y_h)).view(n, c, h, k).permute(0, 2, 3, 1)
        a_w = torch.sigmoid(self.coord_conv_w(y_w)).view(n, c, w, k).permute(0, 2, 3, 1)
        return a_h, a_w

    def official_keys(self):
        keys = super().official_keys()
        c, mip = self.in_channels, self.coord_conv.out_channels
        keys.update({
            "conv1.weight": (self.coord_conv.weight, (mip, c, 1, 1)),
            "conv1.bias": (self.coord_conv.bias, (mip,)),
            "conv_h.weight": (self.coord_conv_h.weight, (c, mip, 1, 1)),
            "conv_h.bias": (self.coord_conv_h.bias, (c,)),
            "conv_w.weight": (self.coord_conv_w.weight, (c, mip, 1, 1)),
            "conv_w.bias": (self.coord_conv_w.bias, (c,)),
        })
        for name in ("weight", "bias", "running_mean", "running_var"):
            keys[f"bn1.{name}"] = (getattr(self.coord_bn, name), (mip,))
        return keys

    @torch.no_grad()
    def load_official_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        tracked = state_dict.pop("bn1.num_batches_tracked", None)
        trailing = super().load_official_state_dict(state_dict)
        if tracked is not None:
            self.coord_bn.num_batches_tracked.copy_(tracked)
        return trailing

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, reduction={self.reduction}"
