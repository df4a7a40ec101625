"""Receptive-field attention convolutions: RFAConv, RFCBAMConv, RFCAConv.

Zhang et al., "RFAConv: Innovating Spatial Attention and Standard Convolutional Operation",
2023, arXiv:2304.03198; official code Liuchen1997/RFAConv. Definition in
``shared/spec/rfa_conv.md``. With x (N, C, H, W), odd kernel k, k2 = k * k taps, stride s:

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

Speed and memory (see benchmarks/RESULTS.md):

* Eval mode folds the BatchNorm into the depthwise conv.
* In training, custom autograd Functions keep only the depthwise conv's output z (k2 / s^2 times
  the input) and recompute BN, ReLU, the attention product and the softmax in backward, instead
  of autograd's four or five k2-sized tensors.

Deviations from the official code, all deliberate:

* The layers end at the convolution: no BatchNorm/ReLU after it (the ``model.py`` copies add
  them; :meth:`load_official_state_dict` hands their entries back to the caller).
* Even kernels (wrong output size officially), padding other than k // 2, dilation != 1 and
  groups != 1 (accepted and ignored or mis-padded officially) raise ValueError.
* One class per layer under the names the papers use (``model.py`` has two ``RFAConv``
  classes, a ``nn.ReLu`` typo, and the ResNet files call ``RFACBAMConv``/``RFACAConv``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.common_types import _size_2_t
from torch.nn.modules.utils import _pair

from attnconv.layers.helpers import check_conv_input, check_positive, layer_name
from attnconv.ops.rfa import _check_impl, rfa_layer_forward, use_fused

__all__ = ["RFAConv2d", "RFCAConv2d", "RFCBAMConv2d"]


# --- the fused pieces: memory-lean autograd Functions ----------------------------------------

def _bn_relu(z: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None):
    """relu(z * scale + shift) as a new tensor (z itself is kept for backward); no affine
    when scale is None."""
    if scale is None:
        return z.clamp_min(0)
    return torch.addcmul(shift, z, scale).relu_()


def _affine(gamma: torch.Tensor | None, beta: torch.Tensor | None, stats):
    """Batch-statistics BN as (scale, shift), or (None, None) when it is folded into z."""
    if stats is None:
        return None, None
    mean, inv_std = stats
    scale = gamma * inv_std
    return scale, beta - mean * scale


def _bn_relu_backward(grad: torch.Tensor, z: torch.Tensor, gamma: torch.Tensor | None,
                      beta: torch.Tensor | None, stats, needs: tuple[bool, ...]):
    """Gradients of relu(BN(z)) w.r.t. z, gamma, beta, with BN over batch statistics
    ``stats = (mean, inv_std)`` (or None: no BN). ``grad`` is overwritten.

    The whole BN backward happens here, in place on ``grad``: three passes over the k2-sized
    data instead of autograd's mean/var graph (which allocated two more such tensors).
    """
    scale, shift = _affine(gamma, beta, stats)
    u = z if scale is None else torch.addcmul(shift, z, scale)
    du = grad.masked_fill_(u <= 0, 0)  # ReLU's derivative is 0 at 0, as in torch
    del u
    if stats is None:
        return du, None, None
    mean, inv_std = stats
    d_beta = du.sum_to_size(scale.shape)
    d_gamma = inv_std * ((du * z).sum_to_size(scale.shape) - mean * d_beta)
    if needs[0]:
        # dz = scale * (du - mean(du) - xhat * mean(du * xhat)), xhat = (z - mean) * inv_std
        count = z.numel() // scale.numel()
        du.mul_(scale).addcmul_(z, -scale * inv_std * d_gamma / count)
        du.add_(-scale * (d_beta - mean * inv_std * d_gamma) / count)
    return (du if needs[0] else None), (d_gamma if needs[1] else None), \
        (d_beta if needs[2] else None)


def _pointwise_conv_backward(grad_out: torch.Tensor, inputs: torch.Tensor, weight: torch.Tensor,
                             has_bias: bool, need_input: bool, need_weight: bool):
    return torch.ops.aten.convolution_backward(
        grad_out, inputs, weight, [weight.shape[0]] if has_bias else None,
        [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [need_input, need_weight, has_bias])


class _RFAFunction(torch.autograd.Function):
    """conv1x1(relu(z * scale + shift) * softmax_taps(a * m)), keeping z and m for backward.

    z (N, C, k2, H, W) is the depthwise conv's output; gamma, beta (1, C, k2, 1, 1) the BN
    affine and stats its detached batch (mean, inv_std), all None when the BN is folded into
    the conv (eval mode); m (N, C, 1, H, W) the pooled input,
    a (1, C, k2, 1, 1) the per-tap logit scales, weight (O, C * k2, 1, 1).
    """

    @staticmethod
    def forward(ctx, z, gamma, beta, stats, m, a, weight, bias):
        attended = _bn_relu(z, *_affine(gamma, beta, stats)).mul_(torch.softmax(m * a, dim=2))
        ctx.save_for_backward(z, gamma, beta, m, a, weight)
        ctx.stats = stats
        ctx.has_bias = bias is not None
        return F.conv2d(attended.flatten(1, 2), weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        z, gamma, beta, m, a, weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        f = _bn_relu(z, *_affine(gamma, beta, ctx.stats))
        p = torch.softmax(m * a, dim=2)
        attended = f * p
        g_att, g_weight, g_bias = _pointwise_conv_backward(
            grad_out, attended.flatten(1, 2), weight, ctx.has_bias, True, needs[6])
        g_att = g_att.view(z.shape)
        # softmax: dl_t = p_t * (G_t f_t - sum_s p_s G_s f_s); product: df = G * p
        total = (g_att * attended).sum(2, keepdim=True)
        del attended
        g_f = g_att.mul_(p)
        g_logits = (g_f * f).sub_(p.mul_(total))
        del f, p, total
        g_m = (g_logits * a).sum(2, keepdim=True) if needs[4] else None
        g_a = (g_logits * m).sum_to_size(a.shape) if needs[5] else None
        del g_logits
        g_z, g_gamma, g_beta = _bn_relu_backward(g_f, z, gamma, beta, ctx.stats, needs[:3])
        return g_z, g_gamma, g_beta, None, g_m, g_a, g_weight, g_bias


class _BNReLUFunction(torch.autograd.Function):
    """relu(BN(z)) over batch statistics (or relu(z)), keeping z (not the output) for
    backward; arguments as in :class:`_RFAFunction`."""

    @staticmethod
    def forward(ctx, z, gamma, beta, stats):
        ctx.save_for_backward(z, gamma, beta)
        ctx.stats = stats
        return _bn_relu(z, *_affine(gamma, beta, stats))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        z, gamma, beta = ctx.saved_tensors
        return (*_bn_relu_backward(grad.clone(), z, gamma, beta, ctx.stats,
                                   ctx.needs_input_grad), None)


class _AttendedPointwiseFunction(torch.autograd.Function):
    """conv1x1(g * f1 * f2) with small broadcast factors f1, f2; g is recomputed from z.

    ``g`` must equal relu(z * scale + shift); its gradient is returned (z, scale and shift get
    none here: their gradient reaches them through g's producer, :class:`_BNReLUFunction`).
    """

    @staticmethod
    def forward(ctx, g, z, scale, shift, f1, f2, weight, bias):
        ctx.save_for_backward(z, scale, shift, f1, f2, weight)
        ctx.has_bias = bias is not None
        return F.conv2d((g * f1).mul_(f2).flatten(1, -3), weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        z, scale, shift, f1, f2, weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        g = _bn_relu(z, scale, shift)
        attended = (g * f1).mul_(f2)
        g_att, g_weight, g_bias = _pointwise_conv_backward(
            grad_out, attended.flatten(1, -3), weight, ctx.has_bias, True, needs[6])
        del attended
        g_att = g_att.view(g.shape)
        g_f1 = (g_att * g).mul_(f2).sum_to_size(f1.shape) if needs[4] else None
        g_f2 = (g_att * g).mul_(f1).sum_to_size(f2.shape) if needs[5] else None
        del g
        g_g = g_att.mul_(f1).mul_(f2) if needs[0] else None
        return g_g, None, None, None, g_f1, g_f2, g_weight, g_bias


def _keep_memory_format(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The layers compute in channels-last (oneDNN's depthwise and 1x1 convs over C * k2
    channels measured 1.5x to 2.7x faster so, and backward ~2x) and answer in x's format."""
    if x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last):
        return out.contiguous()
    return out


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# --- the layers ------------------------------------------------------------------------------

class _ReceptiveFieldConv2d(nn.Conv2d):
    """Shared part: argument checks, the depthwise feature conv + BN, the final conv's weight.

    The module is an nn.Conv2d whose ``weight`` (O, C, k, k) and ``bias`` are the final
    conv's; its stride/padding attributes describe the output geometry (that of
    nn.Conv2d(k, stride, padding=k // 2)).
    """

    #: the official module's key prefix of the depthwise conv + BN ("generate_feature" / "generate")
    _official_feature_prefix = "generate"

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
        check_positive(name, in_channels=in_channels, out_channels=out_channels,
                       kernel_size=kernel_size, stride=stride, dilation=dilation, groups=groups)
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

    def _features(self, x: torch.Tensor):
        """Depthwise conv output z (N, C, k2, H', W') and the BN as (gamma, beta, (mean,
        inv_std)) shaped (1, C, k2, 1, 1), or (None, None, None) when the BN is folded into z
        (eval mode, running statistics)."""
        bn = self.feature_bn
        n, c = x.shape[:2]
        if not self._uses_batch_stats():
            inv_std = torch.rsqrt(bn.running_var + bn.eps)
            scale = bn.weight * inv_std
            shift = bn.bias - bn.running_mean * scale
            z = F.conv2d(x, self.feature_conv.weight * scale.view(-1, 1, 1, 1), shift,
                         self.stride, self.padding, groups=c)
            return z.view(n, c, self.taps, *z.shape[2:]), None, None, None
        z = self.feature_conv(x)
        with torch.no_grad():  # their gradient is part of _bn_relu_backward
            # BatchNorm's own statistics kernel: 10x faster than var_mean on this
            # channels-last k2-wide tensor (0.35 vs 3.6 ms at (64, 72, 16, 16) on 2 CPU threads).
            mean, var = torch.batch_norm_update_stats(z, None, None, 0.0)
        count = z.numel() // z.shape[1]
        if count < 2 and self.training:
            raise ValueError(f"{layer_name(self)}: expected more than 1 value per channel when "
                             f"training (BatchNorm), got input {tuple(x.shape)}")
        self._update_running_stats(mean, var, count)
        shape = (1, c, self.taps, 1, 1)
        stats = (mean.view(shape), torch.rsqrt(var + bn.eps).view(shape))
        return (z.view(n, c, self.taps, *z.shape[2:]), bn.weight.view(shape), bn.bias.view(shape),
                stats)

    def _uses_batch_stats(self) -> bool:
        bn = self.feature_bn
        return self.training or bn.running_mean is None

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
        # the same update as nn.BatchNorm2d.forward in training mode
        bn = self.feature_bn
        if not (self.training and bn.track_running_stats):
            return
        bn.num_batches_tracked.add_(1)
        momentum = (1.0 / float(bn.num_batches_tracked) if bn.momentum is None
                    else bn.momentum)
        bn.running_mean.lerp_(mean, momentum)
        bn.running_var.lerp_(var * (count / (count - 1)), momentum)

    def _pointwise_weight(self) -> torch.Tensor:
        # channel order c * k2 + i * k + j, the order of the official rearrange
        return self.weight.reshape(self.out_channels, -1, 1, 1)

    def _check_input(self, x: torch.Tensor) -> None:
        check_conv_input(self, x, self.in_channels)

    # -- importing the official modules' parameters --

    def _official_keys(self) -> dict[str, tuple[torch.Tensor, tuple[int, ...]]]:
        """official key -> (this layer's tensor, the official shape)."""
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
        keys = self._official_keys()
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

    ``impl``: "fused" runs the fused C++ kernel (:mod:`attnconv.ops.rfa`, built on first use)
    on CPU, "eager" the formulation below, "auto" (the default) the fused kernel wherever it
    runs; None follows :func:`attnconv.ops.set_rfa_impl`. Where the kernel cannot run (CUDA,
    no compiler) the layer runs eager and warns once.
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
        impl: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        _check_impl(impl, f"{type(self).__name__}: impl")
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias, device=device, dtype=dtype)
        self.impl = impl
        self.attn_logit_scale = nn.Parameter(
            torch.empty(in_channels, self.taps, device=device, dtype=dtype))
        # the official grouped 1x1 conv's default init: fan-in 1 -> U(-1, 1)
        nn.init.uniform_(self.attn_logit_scale, -1.0, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if use_fused(type(self).__name__, self.impl, x):
            return _keep_memory_format(x, rfa_layer_forward(self, x))
        return _keep_memory_format(x, self._forward(x.contiguous(
            memory_format=torch.channels_last)))

    def receptive_field_attention(self, x: torch.Tensor) -> torch.Tensor:
        """softmax_t(a[c, t] * avgpool(x)[c]): the weights of the k2 receptive-field members of
        every output position, (N, C, k2, H', W') (for inspection and figures)."""
        self._check_input(x)
        return torch.softmax(self._pooled(x) * self._logit_scale(), dim=2)

    def _pooled(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, self.kernel_size, self.stride, self.padding,
                            count_include_pad=True).unsqueeze(2)

    def _logit_scale(self) -> torch.Tensor:
        return self.attn_logit_scale.view(1, self.in_channels, self.taps, 1, 1)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        z, gamma, beta, stats = self._features(x)
        pooled, logit_scale = self._pooled(x), self._logit_scale()
        weight = self._pointwise_weight()
        if _needs_grad(x, gamma, logit_scale, weight, self.bias, self.feature_conv.weight):
            return _RFAFunction.apply(z, gamma, beta, stats, pooled, logit_scale, weight,
                                      self.bias)
        attended = _bn_relu(z, *_affine(gamma, beta, stats)) if stats else z.relu_()
        attended.mul_(torch.softmax(pooled * logit_scale, dim=2))
        return F.conv2d(attended.flatten(1, 2), weight, self.bias)

    def _official_keys(self):
        keys = super()._official_keys()
        keys["get_weight.1.weight"] = (self.attn_logit_scale,
                                       (self.in_channels * self.taps, 1, 1, 1))
        return keys


class _TileAttentionConv2d(_ReceptiveFieldConv2d):
    """RFCBAM/RFCA: g = ReLU(BN(dwconv(x))), an attention (f1, f2) computed from g (and x),
    then conv_1x1(g * f1 * f2). Subclasses define :meth:`attention` on g in tap layout."""

    def attention(self, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _tap_view(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return _keep_memory_format(x, self._forward(x.contiguous(
            memory_format=torch.channels_last)))

    def receptive_field_attention(self, x: torch.Tensor) -> torch.Tensor:
        """The attention multiplied onto the receptive-field features g (channel x spatial for
        RFCBAM, a_h x a_w for RFCA), (N, C, k2, H', W') (for inspection and figures)."""
        self._check_input(x)
        with torch.no_grad():
            z, _, _, stats, scale, shift = self._tap_features(x)
            g = _bn_relu(z, scale, shift) if stats is not None else z.relu()
        f1, f2 = self.attention(x, g)
        return (f1 * f2).expand_as(g).reshape(x.shape[0], self.in_channels, self.taps,
                                              *z.shape[-2:])

    def _tap_features(self, x: torch.Tensor):
        """:meth:`_features` in the layer's tap view, plus the BN as (scale, shift)."""
        z, gamma, beta, stats = self._features(x)
        z = self._tap_view(z)
        if stats is not None:
            gamma, beta = self._tap_view(gamma), self._tap_view(beta)
            stats = tuple(self._tap_view(t) for t in stats)
        with torch.no_grad():
            scale, shift = _affine(gamma, beta, stats)
        return z, gamma, beta, stats, scale, shift

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        z, gamma, beta, stats, scale, shift = self._tap_features(x)
        weight = self._pointwise_weight()
        if _needs_grad(x, z, weight, self.bias, *self.parameters()):
            g = _BNReLUFunction.apply(z, gamma, beta, stats)
            f1, f2 = self.attention(x, g)
            return _AttendedPointwiseFunction.apply(g, z, scale, shift, f1, f2, weight,
                                                    self.bias)
        g = _bn_relu(z, scale, shift) if stats is not None else z.relu_()
        f1, f2 = self.attention(x, g)
        return F.conv2d(g.mul_(f1).mul_(f2).flatten(1, -3), weight, self.bias)


def _to_tiles(t: torch.Tensor, k: int) -> torch.Tensor:
    """(N, C, k2, H, W) in tap layout -> (N, C, H*k, W*k), the official rearranged layout."""
    n, c, _, h, w = t.shape
    return t.view(n, c, k, k, h, w).permute(0, 1, 4, 2, 5, 3).reshape(n, c, h * k, w * k)


def _from_tiles(t: torch.Tensor, k: int) -> torch.Tensor:
    """(N, C, H*k, W*k) -> (N, C, k2, H, W), the inverse of :func:`_to_tiles`."""
    n, c, hk, wk = t.shape
    return t.view(n, c, hk // k, k, wk // k, k).permute(0, 1, 3, 5, 2, 4).reshape(
        n, c, k * k, hk // k, wk // k)


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
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        check_positive(type(self).__name__, hidden_channels=hidden_channels)
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias, device=device, dtype=dtype)
        factory = {"device": device, "dtype": dtype}
        self.hidden_channels = hidden_channels
        self.channel_fc1 = nn.Linear(in_channels, hidden_channels, bias=False, **factory)
        self.channel_fc2 = nn.Linear(hidden_channels, in_channels, bias=False, **factory)
        self.spatial_conv = nn.Conv2d(2, 1, 3, padding=1, bias=False, **factory)

    def attention(self, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, c = x.shape[:2]
        channel = torch.sigmoid(self.channel_fc2(F.relu(self.channel_fc1(x.mean((2, 3))))))
        # max(dim) keeps indices for backward, amax would keep g itself
        pooled = torch.cat([g.max(dim=1, keepdim=True)[0], g.mean(dim=1, keepdim=True)], dim=1)
        k = self.kernel_size[0]
        spatial = _from_tiles(torch.sigmoid(self.spatial_conv(_to_tiles(pooled, k))), k)
        return channel.view(n, c, 1, 1, 1), spatial

    def _official_keys(self):
        keys = super()._official_keys()
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
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        check_positive(type(self).__name__, reduction=reduction)
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias, device=device, dtype=dtype)
        factory = {"device": device, "dtype": dtype}
        self.reduction = reduction
        mip = max(8, in_channels // reduction)
        self.coord_conv = nn.Conv2d(in_channels, mip, 1, **factory)
        self.coord_bn = nn.BatchNorm2d(mip, **factory)
        self.coord_conv_h = nn.Conv2d(mip, in_channels, 1, **factory)
        self.coord_conv_w = nn.Conv2d(mip, in_channels, 1, **factory)

    def _tap_view(self, z: torch.Tensor) -> torch.Tensor:
        k = self.kernel_size[0]
        return z.view(*z.shape[:2], k, k, *z.shape[3:])  # (N, C, i, j, H', W')

    def attention(self, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, c, k, _, h, w = g.shape
        # rows of the rearranged map are h' * k + i, columns w' * k + j
        rows = g.mean(dim=(3, 5)).transpose(2, 3).reshape(n, c, h * k, 1)
        cols = g.mean(dim=(2, 4)).transpose(2, 3).reshape(n, c, w * k, 1)
        y = F.hardswish(self.coord_bn(self.coord_conv(torch.cat([rows, cols], dim=2))))
        y_h, y_w = torch.split(y, [h * k, w * k], dim=2)
        a_h = torch.sigmoid(self.coord_conv_h(y_h)).view(n, c, h, k).transpose(2, 3)
        a_w = torch.sigmoid(self.coord_conv_w(y_w)).view(n, c, w, k).transpose(2, 3)
        return a_h.reshape(n, c, k, 1, h, 1), a_w.reshape(n, c, 1, k, 1, w)

    def _official_keys(self):
        keys = super()._official_keys()
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
