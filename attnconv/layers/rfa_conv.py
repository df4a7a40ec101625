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

Two paths compute the same function (measured in benchmarks/RESULTS.md):

* On CPU the fused C++ operators of :mod:`attnconv.ops` (tap-major, every core): the layer
  builds their operands from its parameters (``_operands``, ``_fused_factors``); training keeps
  about the input for backward.
* The eager formulation below (any device, export, second derivatives): eval mode folds the
  BatchNorm into the depthwise conv; in training custom autograd Functions keep only the
  depthwise conv's output z (k2 / s^2 times the input) and recompute BN, ReLU, the attention
  product and the softmax in backward.

``impl="auto"`` takes, per layer and mode, the one measured faster on CPU (``_auto_fused``).

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

from attnconv.functional._common import accumulate_dtype, cast, compute_dtype
from attnconv.functional.rfa import (
    attended_pointwise_conv,
    attended_pointwise_reference,
    bn_relu,
    from_tiles,
    rfa_attended_conv,
    rfa_attended_conv_folded,
    to_tiles,
)
from attnconv.layers.base import AttentionConv2d
from attnconv.layers.helpers import (
    check_conv_args,
    check_positive,
    is_exporting,
    layer_name,
)
from attnconv.ops.rfa import RFA_IMPLS, _out_size, rfa_feature_stats, rfa_fused, use_fused
from attnconv.ops.rfa_tile import rfa_tile_attend, rfa_tile_reduce

__all__ = ["RFAConv2d", "RFCAConv2d", "RFCBAMConv2d"]


def _keep_memory_format(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The layers compute in channels-last (oneDNN's depthwise and 1x1 convs over C * k2
    channels measured 1.5x to 2.7x faster so, and backward ~2x) and answer in x's format."""
    if x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last):
        return out.contiguous()
    return out


def _tap_major(t: torch.Tensor, c: int, k2: int) -> torch.Tensor:
    """A per-feature tensor in the layer's order c * k2 + t -> (k2, C), the ops' order."""
    return t.reshape(c, k2).t()


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

    # -- the shared computation --

    def _features(self, x: torch.Tensor, update_stats: bool = True):
        """Depthwise conv output z (N, C, k2, H', W') in x's dtype and the BN as (gamma, beta,
        (mean, inv_std)) shaped (1, C, k2, 1, 1), statistics in float32 for fp16/bf16, or
        (None, None, None) when the BN is folded into z (eval mode, running statistics).
        ``update_stats=False`` leaves the running statistics alone."""
        bn = self.feature_bn
        n, c = x.shape[:2]
        dtype = x.dtype
        if not self._uses_batch_stats():
            z = self._folded_features(x)
            return z.view(n, c, self.taps, *z.shape[2:]), None, None, None
        z = F.conv2d(x, cast(self.feature_conv.weight, dtype), None, self.stride, self.padding,
                     groups=c)
        count = z.numel() // z.shape[1]
        if count < 2 and self.training:
            raise ValueError(f"{layer_name(self)}: expected more than 1 value per channel when "
                             f"training (BatchNorm), got input {tuple(x.shape)}")
        with torch.no_grad():  # their gradient is part of the BN backward of the Functions
            mean, var = self._batch_stats(z, update_stats)
        shape = (1, c, self.taps, 1, 1)
        stats = (mean.view(shape), torch.rsqrt(var + bn.eps).view(shape))
        return (z.view(n, c, self.taps, *z.shape[2:]), bn.weight.view(shape), bn.bias.view(shape),
                stats)

    def _folded_features(self, x: torch.Tensor) -> torch.Tensor:
        """BN(depthwise conv(x)) over the running statistics, as one conv (N, C * k2, H', W')
        in x's dtype (eval mode)."""
        bn = self.feature_bn
        inv_std = torch.rsqrt(bn.running_var + bn.eps)
        scale = bn.weight * inv_std
        shift = bn.bias - bn.running_mean * scale
        return F.conv2d(x, cast(self.feature_conv.weight * scale.view(-1, 1, 1, 1), x.dtype),
                        cast(shift, x.dtype), self.stride, self.padding, groups=x.shape[1])

    def _exports_folded(self) -> bool:
        """Whether this call is an export of the eval-mode layer, which takes the 4-d
        formulation onnxruntime runs fastest (the ReLU right on the depthwise conv's output,
        where onnxruntime fuses it into the conv)."""
        return is_exporting() and not self._uses_batch_stats()

    def _batch_stats(self, z: torch.Tensor, update: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch mean and biased variance of z's channels, updating the running statistics as
        nn.BatchNorm2d does in training (when ``update``).

        BatchNorm's own statistics kernel: 10x faster than var_mean on this channels-last
        k2-wide tensor (0.35 vs 3.6 ms at (64, 72, 16, 16) on 2 CPU threads). Given float32
        running buffers it accumulates and answers in float32 for fp16/bf16 z too.
        """
        bn = self.feature_bn
        if update and self.training and bn.track_running_stats:
            bn.num_batches_tracked.add_(1)
            momentum = (1.0 / float(bn.num_batches_tracked) if bn.momentum is None
                        else bn.momentum)
            running_mean, running_var = bn.running_mean, bn.running_var
        else:
            momentum = 0.0
            acc = accumulate_dtype(z.dtype)
            running_mean = z.new_zeros(z.shape[1], dtype=acc)
            running_var = z.new_ones(z.shape[1], dtype=acc)
        return torch.batch_norm_update_stats(z, running_mean, running_var, momentum)

    def _uses_batch_stats(self) -> bool:
        bn = self.feature_bn
        return self.training or bn.running_mean is None

    def _pointwise_weight(self, dtype: torch.dtype) -> torch.Tensor:
        # channel order c * k2 + i * k + j, the order of the official rearrange
        return cast(self.weight, dtype).reshape(self.out_channels, -1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        # Under autocast (any device type) everything k2-sized runs in the autocast dtype,
        # cast here once; statistics and running buffers stay float32.
        dtype = compute_dtype(x)
        if x.shape[0] == 0:  # as nn.BatchNorm2d: an empty batch in, an empty batch out
            return self._conv_forward(cast(x, dtype), cast(self.weight, dtype),
                                      cast(self.bias, dtype))
        x_cl = cast(x, dtype).contiguous(memory_format=torch.channels_last)
        return _keep_memory_format(x, self._forward(x_cl))

    def _check_input(self, x: torch.Tensor) -> None:
        self.check_input(x)

    # -- the fused ops' operands --

    def _fused(self, x: torch.Tensor, forward) -> torch.Tensor:
        """``forward(x)`` through the fused ops, in x's memory format. Under autocast, and for
        bf16/fp16 tensors, the ops compute in float32 (statistics and softmax need it; the
        GEMM is a small part of the cost) and answer in the autocast dtype, like the
        convolutions they replace."""
        self._check_input(x)
        out_dtype = x.dtype
        if torch.is_autocast_enabled(x.device.type):
            out_dtype = torch.get_autocast_dtype(x.device.type)
        with torch.autocast(x.device.type, enabled=False):
            out = forward(x)
        out = out if out.dtype == out_dtype else out.to(out_dtype)
        return _keep_memory_format(x, out)

    def _operands(self, x: torch.Tensor) -> dict:
        """The tensors the fused ops take, from this layer's parameters (differentiable, in
        the ops' tap-major order) and its input: x in the compute dtype (float32 for
        bf16/fp16), the depthwise weight, the BN affine and statistics, the final conv. Takes
        the BN batch statistics with :func:`rfa_feature_stats` and updates the running ones
        as nn.BatchNorm2d does."""
        bn = self.feature_bn
        c, k2, k, s = self.in_channels, self.taps, self.kernel_size[0], self.stride[0]
        dtype = torch.promote_types(x.dtype, self.weight.dtype)
        if dtype in (torch.bfloat16, torch.float16):
            dtype = torch.float32
        x = x.to(dtype).contiguous(memory_format=torch.channels_last)
        wdt = self.feature_conv.weight.to(dtype).view(c, k2, k2).permute(2, 1, 0)
        gamma = _tap_major(bn.weight.to(dtype), c, k2) if bn.affine else x.new_ones(k2, c)
        beta = _tap_major(bn.bias.to(dtype), c, k2) if bn.affine else x.new_zeros(k2, c)
        wt = self.weight.to(dtype).view(self.out_channels, c, k2).transpose(1, 2).reshape(
            self.out_channels, k2 * c)
        batch_stats = self._uses_batch_stats()
        if batch_stats:
            count = x.shape[0] * _out_size(x.shape[2], k, s) * _out_size(x.shape[3], k, s)
            if count < 2 and self.training:
                raise ValueError(f"{layer_name(self)}: expected more than 1 value per channel "
                                 f"when training (BatchNorm), got input {tuple(x.shape)}")
            with torch.no_grad():
                mean, var = rfa_feature_stats(x.detach(), wdt.detach().contiguous(), k, s)
            self._update_running_stats(mean.t().reshape(-1), var.t().reshape(-1), count)
        else:
            mean = _tap_major(bn.running_mean.to(dtype), c, k2)
            var = _tap_major(bn.running_var.to(dtype), c, k2)
        return {"x": x, "wdt": wdt, "gamma": gamma, "beta": beta, "mean": mean,
                "inv_std": torch.rsqrt(var + bn.eps), "wt": wt,
                "bias": None if self.bias is None else self.bias.to(dtype), "kernel_size": k,
                "stride": s, "batch_stats": batch_stats, "eps": bn.eps, "dtype": dtype}

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
        """nn.BatchNorm2d's running-statistics update (unbiased variance), in the buffers'
        dtype."""
        bn = self.feature_bn
        if not (self.training and bn.track_running_stats):
            return
        bn.num_batches_tracked.add_(1)
        momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), momentum)
        bn.running_var.lerp_((var * (count / (count - 1))).to(bn.running_var.dtype), momentum)

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
    on first use) on CPU, "eager" the formulation below, "auto" (the default) on CPU the path
    measured faster for the layer and mode (``_auto_fused``), on other devices eager (see also
    :func:`attnconv.layers.set_impl`). Where "fused" cannot run (CUDA, no compiler)
    the layer runs eager and warns once with the reason.
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
        # An empty batch takes the eager path, which returns an empty batch as nn.BatchNorm2d does.
        if x.shape[0] > 0 and use_fused(type(self).__name__, self.impl, x,
                                        self._auto_fused[self.training]):
            return self._fused(x, self._fused_forward)
        return super().forward(x)

    def reset_attention(self) -> None:
        """The official RFA ResNets' start: ``attn_logit_scale`` (there the grouped 1x1 conv
        ``get_weight.1``, fan-out C * k2) Kaiming-normal, a near-uniform softmax. A layer built
        on its own keeps the official module's default U(-1, 1) instead."""
        nn.init.normal_(self.attn_logit_scale, std=math.sqrt(2.0 / self.attn_logit_scale.numel()))

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self._operands(x)
        a = self.attn_logit_scale.to(t["dtype"]).t()
        return rfa_fused(t["x"], t["wdt"], t["gamma"], t["beta"], t["mean"], t["inv_std"], a,
                         t["wt"], t["bias"], t["kernel_size"], t["stride"], t["batch_stats"],
                         t["eps"])

    def receptive_field_attention(self, x: torch.Tensor) -> torch.Tensor:
        """softmax_t(a[c, t] * avgpool(x)[c]): the weights of the k2 receptive-field members of
        every output position, (N, C, k2, H', W') (for inspection and figures)."""
        self._check_input(x)
        return torch.softmax(self._pooled(x).unsqueeze(2) * self._logit_scale(), dim=2)

    def _pooled(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, self.kernel_size, self.stride, self.padding,
                            count_include_pad=True)

    def _logit_scale(self) -> torch.Tensor:
        return self.attn_logit_scale.view(1, self.in_channels, self.taps, 1, 1)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._exports_folded():
            return rfa_attended_conv_folded(F.relu(self._folded_features(x)), self._pooled(x),
                                            self.attn_logit_scale,
                                            self._pointwise_weight(x.dtype),
                                            cast(self.bias, x.dtype))
        z, gamma, beta, stats = self._features(x)
        return rfa_attended_conv(z, gamma, beta, stats, self.feature_bn.eps,
                                 self._pooled(x).unsqueeze(2), self._logit_scale(),
                                 self._pointwise_weight(x.dtype), cast(self.bias, x.dtype))

    def official_keys(self):
        keys = super().official_keys()
        keys["get_weight.1.weight"] = (self.attn_logit_scale,
                                       (self.in_channels * self.taps, 1, 1, 1))
        return keys


class _TileAttentionConv2d(_ReceptiveFieldConv2d):
    """RFCBAM/RFCA: g = ReLU(BN(dwconv(x))), an attention (f1, f2) computed from g (and x),
    then conv_1x1(g * f1 * f2). Subclasses define :meth:`attention` on g in tap layout.

    ``impl`` as in :class:`RFAConv2d`; the fused path is :mod:`attnconv.ops.rfa_tile`.
    """

    #: the attention kind of the fused tile ops (0 RFCBAM, 1 RFCA)
    _tile_kind: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 0 and use_fused(type(self).__name__, self.impl, x,
                                        self._auto_fused[self.training]):
            return self._fused(x, self._fused_forward)
        return super().forward(x)

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self._operands(x)
        common = (t["x"], t["wdt"], t["gamma"], t["beta"], t["mean"], t["inv_std"])
        k, s, batch_stats, eps = t["kernel_size"], t["stride"], t["batch_stats"], t["eps"]
        r1, r2 = rfa_tile_reduce(*common, k, s, self._tile_kind, batch_stats, eps)
        f1, f2 = self._fused_factors(t["x"], r1, r2)
        return rfa_tile_attend(*common, f1, f2, t["wt"], t["bias"], k, s, self._tile_kind,
                               batch_stats, eps)

    def _fused_factors(self, x: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention's two factors in the tile ops' layout, from the reductions of g that
        :func:`rfa_tile_reduce` takes."""
        raise NotImplementedError

    def attention(self, x: torch.Tensor, g: torch.Tensor, update_stats: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _tap_view(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def receptive_field_attention(self, x: torch.Tensor) -> torch.Tensor:
        """The attention multiplied onto the receptive-field features g (channel x spatial for
        RFCBAM, a_h x a_w for RFCA), (N, C, k2, H', W') (for inspection and figures). The
        running statistics are left as they are, in training mode too."""
        self._check_input(x)
        x = cast(x, compute_dtype(x))
        with torch.no_grad():
            z, gamma, beta, stats = self._tap_features(x, update_stats=False)
            g = bn_relu(z, gamma, beta, stats, self.feature_bn.eps)
        f1, f2 = self.attention(x, g, update_stats=False)
        return (f1 * f2).expand_as(g).reshape(x.shape[0], self.in_channels, self.taps,
                                              *z.shape[-2:])

    def _tap_features(self, x: torch.Tensor, update_stats: bool = True):
        """:meth:`_features` in the layer's tap view."""
        z, gamma, beta, stats = self._features(x, update_stats)
        z = self._tap_view(z)
        if stats is not None:
            gamma, beta = self._tap_view(gamma), self._tap_view(beta)
            stats = tuple(self._tap_view(t) for t in stats)
        return z, gamma, beta, stats

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._exports_folded():
            z = F.relu(self._folded_features(x))
            g = self._tap_view(z.view(x.shape[0], self.in_channels, self.taps, *z.shape[2:]))
            f1, f2 = self.attention(x, g)
            return attended_pointwise_reference(g, cast(f1, x.dtype), cast(f2, x.dtype),
                                                self._pointwise_weight(x.dtype),
                                                cast(self.bias, x.dtype))
        z, gamma, beta, stats = self._tap_features(x)
        g = bn_relu(z, gamma, beta, stats, self.feature_bn.eps)
        f1, f2 = self.attention(x, g)
        return attended_pointwise_conv(g, z, gamma, beta, stats, self.feature_bn.eps,
                                       cast(f1, x.dtype), cast(f2, x.dtype),
                                       self._pointwise_weight(x.dtype), cast(self.bias, x.dtype))


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

    def attention(self, x: torch.Tensor, g: torch.Tensor, update_stats: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        n, c = x.shape[:2]
        channel = torch.sigmoid(self.channel_fc2(F.relu(self.channel_fc1(x.mean((2, 3))))))
        # max(dim) keeps indices for backward, amax would keep g itself
        pooled = torch.cat([g.max(dim=1, keepdim=True)[0], g.mean(dim=1, keepdim=True)], dim=1)
        k = self.kernel_size[0]
        spatial = from_tiles(torch.sigmoid(self.spatial_conv(to_tiles(pooled, k))), k)
        return channel.view(n, c, 1, 1, 1), spatial

    def _fused_factors(self, x, r1, r2):
        """The channel gate (N, C) and the spatial gate (N, H', W', k2) from the max and mean
        over channels (N, H', W', k2)."""
        n, h, w, k2 = r1.shape
        k = self.kernel_size[0]
        pdtype = self.channel_fc1.weight.dtype
        channel = torch.sigmoid(self.channel_fc2(F.relu(self.channel_fc1(
            x.mean((2, 3)).to(pdtype)))))
        pooled = torch.stack([r1, r2], dim=1).permute(0, 1, 4, 2, 3)  # (N, 2, k2, H', W')
        spatial = torch.sigmoid(self.spatial_conv(to_tiles(pooled.to(pdtype), k)))
        # (N, 1, H'k, W'k) -> (N, H', W', k2)
        spatial = spatial.view(n, h, k, w, k).permute(0, 1, 3, 2, 4).reshape(n, h, w, k2)
        return channel.to(x.dtype), spatial.to(x.dtype)

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

    def _tap_view(self, z: torch.Tensor) -> torch.Tensor:
        k = self.kernel_size[0]
        return z.view(*z.shape[:2], k, k, *z.shape[3:])  # (N, C, i, j, H', W')

    def attention(self, x: torch.Tensor, g: torch.Tensor, update_stats: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        n, c, k, _, h, w = g.shape
        if is_exporting():
            # onnxruntime reduces one axis at a time ~3x faster than two axes apart
            row_means, col_means = g.mean(5).mean(3), g.mean(4).mean(2)
        else:
            row_means, col_means = g.mean(dim=(3, 5)), g.mean(dim=(2, 4))
        # rows of the rearranged map are h' * k + i, columns w' * k + j
        rows = row_means.transpose(2, 3).reshape(n, c, h * k, 1)
        cols = col_means.transpose(2, 3).reshape(n, c, w * k, 1)
        y = self.coord_conv(torch.cat([rows, cols], dim=2))
        bn = self.coord_bn
        if update_stats or not bn.training:
            y = bn(y)
        else:  # batch statistics, as bn(y) in training, without touching the running ones
            y = F.batch_norm(y, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
        y = F.hardswish(y)
        y_h, y_w = torch.split(y, [h * k, w * k], dim=2)
        a_h = torch.sigmoid(self.coord_conv_h(y_h)).view(n, c, h, k).transpose(2, 3)
        a_w = torch.sigmoid(self.coord_conv_w(y_w)).view(n, c, w, k).transpose(2, 3)
        return a_h.reshape(n, c, k, 1, h, 1), a_w.reshape(n, c, 1, k, 1, w)

    def _fused_factors(self, x, r1, r2):
        """a_h (N, H', k, C) and a_w (N, W', k, C) from the row and column means."""
        n, h, k, c = r1.shape
        w = r2.shape[1]
        pdtype = self.coord_conv.weight.dtype
        rows = r1.permute(0, 3, 1, 2).reshape(n, c, h * k, 1)
        cols = r2.permute(0, 3, 1, 2).reshape(n, c, w * k, 1)
        y = F.hardswish(self.coord_bn(self.coord_conv(
            torch.cat([rows, cols], dim=2).to(pdtype))))
        y_h, y_w = torch.split(y, [h * k, w * k], dim=2)
        a_h = torch.sigmoid(self.coord_conv_h(y_h)).view(n, c, h, k).permute(0, 2, 3, 1)
        a_w = torch.sigmoid(self.coord_conv_w(y_w)).view(n, c, w, k).permute(0, 2, 3, 1)
        return a_h.to(x.dtype), a_w.to(x.dtype)

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
