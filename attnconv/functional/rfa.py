"""The receptive-field attention convs (RFAConv, RFCBAMConv, RFCAConv) as functions of their
tensors, as ``torch.nn.functional`` is to ``torch.nn``.

Zhang et al., "RFAConv: Innovating Spatial Attention and Standard Convolutional Operation",
2023, arXiv:2304.03198. With z = depthwise_k,s(x) viewed (N, C, k2, H', W') (the conv's channel
order c * k2 + t, which every tensor here keeps) and BN over batch statistics (or folded into
z with running ones):

    g = ReLU(BN(z))
    RFAConv:          out = conv_1x1(g * softmax_t(m * a), W.reshape(O, C * k2)) + b
    RFCBAM / RFCA:    out = conv_1x1(g * f1 * f2, W.reshape(O, C * k2)) + b

:func:`rfa_conv2d` and :func:`rfa_tile_conv2d` are the entry points: the layers call them with
their parameters, and so do the fused operators' second derivatives. Each runs either the C++
operators (``fused=True``, :mod:`attnconv.ops`, which take the same tensors) or the eager
formulation below, whose autograd Functions keep only z (k2 / s^2 times the input) for
backward and recompute BN, ReLU, the attention product and the softmax there. When autograd
records a backward (``create_graph=True``, for a second derivative), the Functions
differentiate the plain ``*_reference`` formulations instead, so second-order gradients are
exact.

Mixed precision: z, g, the attention product and the final conv run in the autocast dtype;
BN statistics, the softmax logits and the parameter-gradient sums over the batch run in float32
for fp16/bf16; the fused operators compute in float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from attnconv import ops
from attnconv.functional._common import (
    LOW_PRECISION,
    accumulate_dtype,
    cast,
    compute_dtype,
    is_exporting,
    recompute_backward,
)

Stats = tuple[torch.Tensor, torch.Tensor] | None


# --- the tile layout of the official code ---------------------------------------------------

def to_tiles(t: torch.Tensor, k: int) -> torch.Tensor:
    """(N, C, k2, H, W) in tap layout -> (N, C, H*k, W*k), the official rearranged layout
    (einops ``b c (n1 n2) h w -> b c (h n1) (w n2)``)."""
    n, c, _, h, w = t.shape
    return t.view(n, c, k, k, h, w).permute(0, 1, 4, 2, 5, 3).reshape(n, c, h * k, w * k)


def from_tiles(t: torch.Tensor, k: int) -> torch.Tensor:
    """(N, C, H*k, W*k) -> (N, C, k2, H, W), the inverse of :func:`to_tiles`."""
    n, c, hk, wk = t.shape
    return t.view(n, c, hk // k, k, wk // k, k).permute(0, 1, 3, 5, 2, 4).reshape(
        n, c, k * k, hk // k, wk // k)


# --- plain formulations (reference, fallback and double backward) ----------------------------

def _reduced_dims(z: torch.Tensor, param: torch.Tensor) -> tuple[int, ...]:
    """The dims BN reduces: where the (1, C, ..., 1, 1) parameter broadcasts (always dim 0,
    so that a reduction over no dim never means over all of them)."""
    return (0, *(i for i, (a, b) in enumerate(zip(z.shape, param.shape, strict=True))
                 if i > 0 and b == 1 and a != 1))


def bn_relu_reference(z: torch.Tensor, gamma: torch.Tensor | None, beta: torch.Tensor | None,
                      eps: float) -> torch.Tensor:
    """ReLU(BN(z)) over z's batch statistics (biased variance, as BatchNorm in training);
    ``gamma``/``beta`` are (1, C, ..., 1, 1) broadcast shapes. No BN when gamma is None."""
    if gamma is None:
        return torch.relu(z)
    acc = accumulate_dtype(z.dtype)
    var, mean = torch.var_mean(z.to(acc), _reduced_dims(z, gamma), correction=0, keepdim=True)
    return torch.relu((z.to(acc) - mean) * torch.rsqrt(var + eps) * gamma + beta).to(z.dtype)


def tap_softmax(pooled: torch.Tensor, logit_scale: torch.Tensor, dtype: torch.dtype
                ) -> torch.Tensor:
    """softmax over the k2 taps of ``pooled * logit_scale``, logits in float32 at least."""
    acc = accumulate_dtype(dtype)
    return torch.softmax(cast(pooled, acc) * cast(logit_scale, acc), dim=2).to(dtype)


def rfa_reference(z, gamma, beta, eps, pooled, logit_scale, weight, bias) -> torch.Tensor:
    """RFAConv's attended 1x1 conv (see the module docstring) by plain autograd ops."""
    g = bn_relu_reference(z, gamma, beta, eps)
    attended = g * tap_softmax(pooled, logit_scale, g.dtype)
    return F.conv2d(attended.flatten(1, 2), cast(weight, g.dtype), cast(bias, g.dtype))


def attended_pointwise_reference(g, f1, f2, weight, bias) -> torch.Tensor:
    """conv_1x1(g * f1 * f2) by plain autograd ops (RFCBAM, RFCA)."""
    return F.conv2d((g * f1 * f2).flatten(1, -3), cast(weight, g.dtype), cast(bias, g.dtype))


# --- the fused pieces: memory-lean autograd Functions ----------------------------------------

def bn_affine(gamma: torch.Tensor | None, beta: torch.Tensor | None, stats: Stats,
              dtype: torch.dtype):
    """Batch-statistics BN as (scale, shift) in ``dtype``, or (None, None) without BN."""
    if stats is None:
        return None, None
    mean, inv_std = stats
    scale = gamma * inv_std
    return cast(scale, dtype), cast(beta - mean * scale, dtype)


def _bn_relu(z: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None):
    """relu(z * scale + shift) as a new tensor (z itself is kept for backward); no affine
    when scale is None."""
    if scale is None:
        return z.clamp_min(0)
    return torch.addcmul(shift, z, scale).relu_()


def _sum_to(t: torch.Tensor, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` summed to ``like``'s broadcast shape, accumulated and returned in ``dtype``."""
    dims = tuple(i for i, (a, b) in enumerate(zip(t.shape, like.shape, strict=True))
                 if b == 1 and a != 1)
    return t.sum(dims, keepdim=True, dtype=dtype) if dims else t.to(dtype)


def _bn_relu_backward(grad: torch.Tensor, z: torch.Tensor, gamma: torch.Tensor | None,
                      beta: torch.Tensor | None, stats: Stats, needs: tuple[bool, ...]):
    """Gradients of relu(BN(z)) w.r.t. z, gamma, beta, with BN over batch statistics
    ``stats = (mean, inv_std)`` (or None: no BN). ``grad`` is overwritten.

    The whole BN backward happens here, in place on ``grad``: three passes over the k2-sized
    data instead of autograd's mean/var graph (which allocated two more such tensors).
    """
    scale, shift = bn_affine(gamma, beta, stats, z.dtype)
    u = z if scale is None else torch.addcmul(shift, z, scale)
    du = grad.masked_fill_(u <= 0, 0)  # ReLU's derivative is 0 at 0, as in torch
    del u
    if stats is None:
        return du, None, None
    mean, inv_std = stats
    acc = mean.dtype
    d_beta = _sum_to(du, gamma, acc)
    d_gamma = inv_std * (_sum_to(du * z, gamma, acc) - mean * d_beta)
    if needs[0]:
        # dz = scale * (du - mean(du) - xhat * mean(du * xhat)), xhat = (z - mean) * inv_std
        count = z.numel() // gamma.numel()
        scale = gamma * inv_std
        du.mul_(cast(scale, z.dtype)).addcmul_(z, cast(-scale * inv_std * d_gamma / count,
                                                       z.dtype))
        du.add_(cast(-scale * (d_beta - mean * inv_std * d_gamma) / count, z.dtype))
    return (du if needs[0] else None), (d_gamma if needs[1] else None), \
        (d_beta if needs[2] else None)


def _pointwise_conv_backward(grad_out: torch.Tensor, inputs: torch.Tensor, weight: torch.Tensor,
                             has_bias: bool, need_input: bool, need_weight: bool):
    return torch.ops.aten.convolution_backward(
        grad_out, inputs, weight, [weight.shape[0]] if has_bias else None,
        [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [need_input, need_weight, has_bias])


class _RFAFunction(torch.autograd.Function):
    """conv1x1(relu(BN(z)) * softmax_taps(a * m)), keeping z and m for backward.

    z (N, C, k2, H, W) is the depthwise conv's output; gamma, beta (1, C, k2, 1, 1) the BN
    affine and stats its detached batch (mean, inv_std), all None when the BN is folded into
    the conv (eval mode); m (N, C, 1, H, W) the pooled input,
    a (1, C, k2, 1, 1) the per-tap logit scales, weight (O, C * k2, 1, 1), all but the BN
    parameters and stats in z's dtype.
    """

    @staticmethod
    def forward(ctx, z, gamma, beta, stats, eps, m, a, weight, bias):
        attended = _bn_relu(z, *bn_affine(gamma, beta, stats, z.dtype)).mul_(
            tap_softmax(m, a, z.dtype))
        ctx.save_for_backward(z, gamma, beta, m, a, weight, bias)
        ctx.stats, ctx.eps = stats, eps
        return F.conv2d(attended.flatten(1, 2), weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        z, gamma, beta, m, a, weight, bias = ctx.saved_tensors
        needs = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph=True: differentiate the plain formulation
            g_z, g_gamma, g_beta, g_m, g_a, g_weight, g_bias = recompute_backward(
                needs[:3] + needs[5:], lambda z, gamma, beta, *rest: rfa_reference(
                    z, gamma, beta, ctx.eps, *rest),
                (z, gamma, beta, m, a, weight, bias), grad_out)
            return g_z, g_gamma, g_beta, None, None, g_m, g_a, g_weight, g_bias
        acc = accumulate_dtype(z.dtype)
        f = _bn_relu(z, *bn_affine(gamma, beta, ctx.stats, z.dtype))
        p = tap_softmax(m, a, z.dtype)
        attended = f * p
        g_att, g_weight, g_bias = _pointwise_conv_backward(
            grad_out, attended.flatten(1, 2), weight, bias is not None, True, needs[7])
        g_att = g_att.view(z.shape)
        # softmax: dl_t = p_t * (G_t f_t - sum_s p_s G_s f_s); product: df = G * p
        total = (g_att * attended).sum(2, keepdim=True)
        del attended
        g_f = g_att.mul_(p)
        g_logits = (g_f * f).sub_(p.mul_(total))
        del f, p, total
        g_m = (g_logits * a).sum(2, keepdim=True) if needs[5] else None
        g_a = _sum_to(g_logits * m, a, acc) if needs[6] else None
        del g_logits
        g_z, g_gamma, g_beta = _bn_relu_backward(g_f, z, gamma, beta, ctx.stats, needs[:3])
        return g_z, g_gamma, g_beta, None, None, g_m, g_a, g_weight, g_bias


class _BNReLUFunction(torch.autograd.Function):
    """relu(BN(z)) over batch statistics (or relu(z)), keeping z (not the output) for
    backward; arguments as in :class:`_RFAFunction`."""

    @staticmethod
    def forward(ctx, z, gamma, beta, stats, eps):
        ctx.save_for_backward(z, gamma, beta)
        ctx.stats, ctx.eps = stats, eps
        return _bn_relu(z, *bn_affine(gamma, beta, stats, z.dtype))

    @staticmethod
    def backward(ctx, grad):
        z, gamma, beta = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():
            grads = recompute_backward(
                needs, lambda *t: bn_relu_reference(*t, ctx.eps), (z, gamma, beta), grad)
        else:
            grads = _bn_relu_backward(grad.clone(), z, gamma, beta, ctx.stats, needs)
        return (*grads, None, None)


class _AttendedPointwiseFunction(torch.autograd.Function):
    """conv1x1(g * f1 * f2) with small broadcast factors f1, f2; g is recomputed from z.

    ``g`` must equal relu(BN(z)) (arguments as in :class:`_RFAFunction`); its gradient is
    returned (z, gamma and beta get none here: their gradient reaches them through g's
    producer, :class:`_BNReLUFunction`).
    """

    @staticmethod
    def forward(ctx, g, z, gamma, beta, stats, eps, f1, f2, weight, bias):
        ctx.save_for_backward(z, gamma, beta, f1, f2, weight, bias)
        ctx.stats, ctx.eps = stats, eps
        return F.conv2d((g * f1).mul_(f2).flatten(1, -3), weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        z, gamma, beta, f1, f2, weight, bias = ctx.saved_tensors
        needs = ctx.needs_input_grad
        if torch.is_grad_enabled():
            # g rebuilt by plain ops from z, gamma, beta carries g's true dependence on them,
            # so the second derivative through g-dependent terms (df1, df2) is exact.
            def plain(z, gamma, beta, f1, f2, weight, bias):
                g = bn_relu_reference(z, gamma, beta, ctx.eps) if ctx.stats is not None \
                    else torch.relu(z)
                return attended_pointwise_reference(g, f1, f2, weight, bias), \
                    (g, f1, f2, weight, bias)

            g_g, g_f1, g_f2, g_weight, g_bias = recompute_backward(
                (needs[0], *needs[6:]), plain, (z, gamma, beta, f1, f2, weight, bias),
                grad_out)
            return g_g, None, None, None, None, None, g_f1, g_f2, g_weight, g_bias
        acc = accumulate_dtype(z.dtype)
        g = _bn_relu(z, *bn_affine(gamma, beta, ctx.stats, z.dtype))
        attended = (g * f1).mul_(f2)
        g_att, g_weight, g_bias = _pointwise_conv_backward(
            grad_out, attended.flatten(1, -3), weight, bias is not None, True, needs[8])
        del attended
        g_att = g_att.view(g.shape)
        g_f1 = _sum_to((g_att * g).mul_(f2), f1, acc).to(f1.dtype) if needs[6] else None
        g_f2 = _sum_to((g_att * g).mul_(f1), f2, acc).to(f2.dtype) if needs[7] else None
        del g
        g_g = g_att.mul_(f1).mul_(f2) if needs[0] else None
        return g_g, None, None, None, None, None, g_f1, g_f2, g_weight, g_bias


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# --- the eager pieces ------------------------------------------------------------------------

def rfa_attended_conv(z: torch.Tensor, gamma: torch.Tensor | None, beta: torch.Tensor | None,
                      stats: Stats, eps: float, pooled: torch.Tensor, logit_scale: torch.Tensor,
                      weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """RFAConv after its depthwise conv: conv_1x1(ReLU(BN(z)) * softmax_t(pooled * a)).

    ``stats`` are z's detached batch (mean, inv_std) (the gradient through them is part of the
    backward), or None with gamma and beta when the BN is folded into z.
    """
    if _needs_grad(z, gamma, beta, pooled, logit_scale, weight, bias):
        return _RFAFunction.apply(z, gamma, beta, stats, eps, pooled, logit_scale, weight, bias)
    attended = _bn_relu(z, *bn_affine(gamma, beta, stats, z.dtype)) if stats else z.relu_()
    attended.mul_(tap_softmax(pooled, logit_scale, z.dtype))
    return F.conv2d(attended.flatten(1, 2), weight, bias)


def rfa_attended_conv_folded(g: torch.Tensor, pooled: torch.Tensor, logit_scale: torch.Tensor,
                             weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """RFAConv after its depthwise conv in eval mode, on 4-d tensors: conv_1x1(g *
    softmax_t(pooled * a)) for g = ReLU(z) (N, C * k2, H, W) with the BN folded into z,
    pooled (N, C, H, W) and the logit scales a (C, k2).

    The form onnxruntime runs fastest (the layers take it under export): its Softmax over a
    middle axis transposes the k2-sized tensor there and back, so the softmax is exp / sum
    over the taps of logits shifted by their exact maximum, m * max_t(a) or m * min_t(a), found
    on C-sized tensors; no tensor has more than 4 dims, so nothing stands between the
    depthwise conv and its ReLU.
    """
    n, _, h, w = g.shape
    c, k2 = logit_scale.shape
    acc = accumulate_dtype(g.dtype)
    m = cast(pooled, acc).reshape(n, c, 1, h * w)
    a = cast(logit_scale, acc).view(1, c, k2, 1)
    shift = torch.maximum(m * a.amax(2, keepdim=True), m * a.amin(2, keepdim=True))
    e = torch.exp(m * a - shift)
    attention = cast(e / e.sum(2, keepdim=True), g.dtype)
    attended = (g.view(n, c, k2, h * w) * attention).view(n, c * k2, h, w)
    return F.conv2d(attended, weight, bias)


def bn_relu(z: torch.Tensor, gamma: torch.Tensor | None, beta: torch.Tensor | None,
            stats: Stats, eps: float) -> torch.Tensor:
    """ReLU(BN(z)) (or ReLU(z) when ``stats`` is None), keeping only z for backward.
    Without gradients z itself is overwritten when there is no BN."""
    if _needs_grad(z, gamma, beta):
        return _BNReLUFunction.apply(z, gamma, beta, stats, eps)
    return _bn_relu(z, *bn_affine(gamma, beta, stats, z.dtype)) if stats is not None \
        else z.relu_()


def attended_pointwise_conv(g: torch.Tensor, z: torch.Tensor, gamma: torch.Tensor | None,
                            beta: torch.Tensor | None, stats: Stats, eps: float,
                            f1: torch.Tensor, f2: torch.Tensor, weight: torch.Tensor,
                            bias: torch.Tensor | None) -> torch.Tensor:
    """conv_1x1(g * f1 * f2) for g = :func:`bn_relu` (z, ...) (RFCBAM, RFCA); without
    gradients g is overwritten."""
    if _needs_grad(g, f1, f2, weight, bias):
        return _AttendedPointwiseFunction.apply(g, z, gamma, beta, stats, eps, f1, f2, weight,
                                                bias)
    return F.conv2d(g.mul_(f1).mul_(f2).flatten(1, -3), weight, bias)


# --- the entry points the layers call -------------------------------------------------------

def rfa_conv2d(x: Tensor, weight_dw: Tensor, bn_weight: Tensor | None, bn_bias: Tensor | None,
               running_mean: Tensor | None, running_var: Tensor | None, logit_scale: Tensor,
               weight: Tensor, bias: Tensor | None = None, stride: int = 1,
               training: bool = False, momentum: float = 0.1, eps: float = 1e-5,
               fused: bool = False) -> Tensor:
    """RFAConv (Zhang et al. 2023, the grouped RFAConv) as a function of its tensors, as
    ``F.batch_norm`` is of BatchNorm's:

        out = conv_1x1(ReLU(BN(dwconv(x)))[c, t] * softmax_t(a[c, t] * avgpool(x)[c]),
                       weight.reshape(O, C * k2)) + bias

    ``weight_dw`` (C * k2, 1, k, k) the depthwise conv; ``bn_weight``, ``bn_bias``,
    ``running_mean``, ``running_var`` (C * k2) its BatchNorm, with ``training``, ``momentum``
    and ``eps`` as in ``F.batch_norm`` (batch statistics when training, the running ones
    updated in place when given); ``logit_scale`` (C, k2); ``weight`` (O, C, k, k) and ``bias``
    the final conv. ``fused``: the C++ operator (CPU) instead of the eager formulation.
    Answers in x's memory format and compute dtype (autocast's when on).
    """
    if x.shape[0] == 0:
        return _empty_batch(x, weight, bias, stride)
    if fused:
        def run(x, t):
            return ops.rfa_fused(
                x, t["weight_dw"], t["gamma"], t["beta"], t["mean"], t["var"],
                logit_scale.to(x.dtype), t["weight"], t["bias"], stride, training, eps)
        return _fused(x, weight_dw, bn_weight, bn_bias, running_mean, running_var, weight, bias,
                      stride, training, momentum, eps, run)
    x_in, x = x, _compute_input(x)
    dtype = x.dtype
    k = weight_dw.shape[-1]
    pooled = F.avg_pool2d(x, k, stride, k // 2, count_include_pad=True)
    pointwise = cast(weight, dtype).reshape(weight.shape[0], -1, 1, 1)
    z, gamma, beta, stats = _features(x, weight_dw, bn_weight, bn_bias, running_mean,
                                      running_var, stride, training, momentum, eps)
    if stats is None and is_exporting():  # the formulation onnxruntime runs fastest
        out = rfa_attended_conv_folded(F.relu(z), pooled, logit_scale, pointwise,
                                       cast(bias, dtype))
    else:
        out = rfa_attended_conv(z.unflatten(1, logit_scale.shape), gamma, beta, stats, eps,
                                pooled.unsqueeze(2),
                                logit_scale.view(1, *logit_scale.shape, 1, 1), pointwise,
                                cast(bias, dtype))
    return _keep_memory_format(x_in, out)


Factors = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


def rfa_tile_conv2d(x: Tensor, weight_dw: Tensor, bn_weight: Tensor | None,
                    bn_bias: Tensor | None, running_mean: Tensor | None,
                    running_var: Tensor | None, factors: Factors, weight: Tensor,
                    bias: Tensor | None = None, stride: int = 1, kind: int = 0,
                    training: bool = False, momentum: float = 0.1, eps: float = 1e-5,
                    fused: bool = False) -> Tensor:
    """RFCBAMConv (``kind`` 0) or RFCAConv (1), Zhang et al. 2023:
    ``conv_1x1(g * f1 * f2, weight.reshape(O, C * k2)) + bias`` with g = ReLU(BN(dwconv(x)))
    and the attention's two factors ``factors(x, r1, r2)`` computed from small reductions of g
    (:func:`tile_reductions`; the factors' shapes are in :func:`tile_factors`). The other
    arguments as in :func:`rfa_conv2d`.
    """
    if x.shape[0] == 0:
        return _empty_batch(x, weight, bias, stride)
    if fused:
        def run(x, t):
            common = (x, t["weight_dw"], t["gamma"], t["beta"], t["mean"], t["var"])
            r1, r2, handle = ops.rfa_tile_reduce(*common, stride, kind, training, eps)
            f1, f2 = factors(x, r1, r2)
            return ops.rfa_tile_attend(
                *common, f1.to(x.dtype), f2.to(x.dtype), t["weight"], t["bias"], handle, stride,
                kind, training, eps)
        return _fused(x, weight_dw, bn_weight, bn_bias, running_mean, running_var, weight, bias,
                      stride, training, momentum, eps, run)
    x_in, x = x, _compute_input(x)
    z, gamma, beta, stats = _features(x, weight_dw, bn_weight, bn_bias, running_mean,
                                      running_var, stride, training, momentum, eps)
    exporting = stats is None and is_exporting()
    if exporting:  # the ReLU right on the depthwise conv's output, where onnxruntime fuses it
        g = _tile_view(weight_dw.shape[-1], F.relu(z), None, None, None)[0]
    else:
        z, gamma, beta, stats = _tile_view(weight_dw.shape[-1], z, gamma, beta, stats)
        g = bn_relu(z, gamma, beta, stats, eps)
    f1, f2 = tile_factors(*factors(x, *tile_reductions(g, kind)), kind)
    f1, f2 = cast(f1, x.dtype), cast(f2, x.dtype)
    pointwise = cast(weight, x.dtype).reshape(weight.shape[0], -1, 1, 1)
    if exporting:
        out = attended_pointwise_reference(g, f1, f2, pointwise, cast(bias, x.dtype))
    else:
        out = attended_pointwise_conv(g, z, gamma, beta, stats, eps, f1, f2, pointwise,
                                      cast(bias, x.dtype))
    return _keep_memory_format(x_in, out)


def rfa_tile_attention(x: Tensor, weight_dw: Tensor, bn_weight: Tensor | None,
                       bn_bias: Tensor | None, running_mean: Tensor | None,
                       running_var: Tensor | None, factors: Factors, stride: int = 1,
                       kind: int = 0, training: bool = False, eps: float = 1e-5) -> Tensor:
    """The attention :func:`rfa_tile_conv2d` multiplies onto g, (N, C, k2, H', W') (for
    inspection and figures); running statistics are read, never updated."""
    x = cast(x, compute_dtype(x))
    with torch.no_grad():
        g = tile_features(x, weight_dw, bn_weight, bn_bias, running_mean, running_var, stride,
                          training, eps)
    f1, f2 = tile_factors(*factors(x, *tile_reductions(g, kind)), kind)
    n, c, k, _, h, w = g.shape
    return (f1 * f2).expand(g.shape).reshape(n, c, k * k, h, w)


def tile_features(x: Tensor, weight_dw: Tensor, bn_weight: Tensor | None,
                  bn_bias: Tensor | None, running_mean: Tensor | None,
                  running_var: Tensor | None, stride: int = 1, training: bool = False,
                  eps: float = 1e-5) -> Tensor:
    """g = ReLU(BN(dwconv(x))) in the tile view (N, C, k, k, H', W'); batch statistics when
    ``training`` (running ones never updated)."""
    z, gamma, beta, stats = _tile_view(weight_dw.shape[-1], *_features(
        x, weight_dw, bn_weight, bn_bias, None if training else running_mean,
        None if training else running_var, stride, training, 0.0, eps))
    return bn_relu(z, gamma, beta, stats, eps)


def tile_reductions(g: Tensor, kind: int) -> tuple[Tensor, Tensor]:
    """The reductions of g (N, C, k, k, H', W') the tile attentions start from:
    RFCBAM (kind 0) the max and mean over channels, (N, H', W', k2) each; RFCA (1) the means
    over (j, w') and over (i, h'), (N, H', k, C) and (N, W', k, C)."""
    n, _, k, _, h, w = g.shape
    if kind == 0:  # max(dim) keeps indices for backward, amax would keep g itself
        return (g.max(dim=1)[0].permute(0, 3, 4, 1, 2).reshape(n, h, w, k * k),
                g.mean(dim=1).permute(0, 3, 4, 1, 2).reshape(n, h, w, k * k))
    if is_exporting():  # onnxruntime reduces one axis at a time ~3x faster than two axes apart
        rows, cols = g.mean(5).mean(3), g.mean(4).mean(2)
    else:
        rows, cols = g.mean(dim=(3, 5)), g.mean(dim=(2, 4))
    return rows.permute(0, 3, 2, 1), cols.permute(0, 3, 2, 1)


def tile_factors(f1: Tensor, f2: Tensor, kind: int) -> tuple[Tensor, Tensor]:
    """The attention's factors as views that broadcast against g (N, C, k, k, H', W'):
    RFCBAM's channel gate (N, C) and spatial gate (N, H', W', k2); RFCA's a_h (N, H', k, C) and
    a_w (N, W', k, C)."""
    if kind == 0:
        n, h, w, k2 = f2.shape
        k = math.isqrt(k2)
        return (f1.view(*f1.shape, 1, 1, 1, 1),
                f2.view(n, h, w, k, k).permute(0, 3, 4, 1, 2).unsqueeze(1))
    return (f1.permute(0, 3, 2, 1)[:, :, :, None, :, None],
            f2.permute(0, 3, 2, 1)[:, :, None, :, None, :])


# --- shared by the entry points ----------------------------------------------------------------

def _empty_batch(x: Tensor, weight: Tensor, bias: Tensor | None, stride: int) -> Tensor:
    """An empty batch in, an empty batch out (as nn.BatchNorm2d), of the right shape."""
    dtype = compute_dtype(x)
    k = weight.shape[-1]
    return F.conv2d(cast(x, dtype), cast(weight, dtype), cast(bias, dtype), stride, k // 2)


def _compute_input(x: Tensor) -> Tensor:
    """x in the compute dtype (autocast's when on: everything k2-sized runs in it; statistics
    and running buffers stay float32) and channels-last (oneDNN's depthwise and 1x1 convs over
    C * k2 channels measured 1.5x to 2.7x faster so, and their backward ~2x)."""
    return cast(x, compute_dtype(x)).contiguous(memory_format=torch.channels_last)


def _keep_memory_format(x: Tensor, out: Tensor) -> Tensor:
    """``out`` in x's memory format."""
    if x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last):
        return out.contiguous()
    return out


def _features(x: Tensor, weight_dw: Tensor, bn_weight: Tensor | None, bn_bias: Tensor | None,
              running_mean: Tensor | None, running_var: Tensor | None, stride: int,
              training: bool, momentum: float, eps: float):
    """The depthwise conv's output z (N, C * k2, H', W') in x's dtype and its BN as (gamma,
    beta, (mean, inv_std)) shaped (1, C, k2, 1, 1) (statistics float32 for fp16/bf16, the
    running ones updated when given); with running statistics (not training) the BN is folded
    into the conv and those three are None."""
    c = x.shape[1]
    k = weight_dw.shape[-1]
    k2 = k * k
    dtype = x.dtype
    if not training:
        inv_std = torch.rsqrt(running_var + eps)
        scale = inv_std if bn_weight is None else bn_weight * inv_std
        shift = -running_mean * scale if bn_bias is None else bn_bias - running_mean * scale
        z = F.conv2d(x, cast(weight_dw * scale.view(-1, 1, 1, 1), dtype), cast(shift, dtype),
                     stride, k // 2, groups=c)
        return z, None, None, None
    z = F.conv2d(x, cast(weight_dw, dtype), None, stride, k // 2, groups=c)
    with torch.no_grad():  # their gradient is part of the BN backward of the Functions
        if running_mean is None:
            acc = accumulate_dtype(dtype)
            running_mean, running_var = z.new_zeros(z.shape[1], dtype=acc), z.new_ones(
                z.shape[1], dtype=acc)
            momentum = 0.0
        # BatchNorm's own statistics kernel: 10x faster than var_mean on this channels-last
        # k2-wide tensor (0.35 vs 3.6 ms at (64, 72, 16, 16) on 2 CPU threads)
        mean, var = torch.batch_norm_update_stats(z, running_mean, running_var, momentum)
    shape = (1, c, k2, 1, 1)
    gamma, beta = _affine(bn_weight, bn_bias, z.shape[1], mean)
    return (z, gamma.view(shape), beta.view(shape),
            (mean.view(shape), torch.rsqrt(var + eps).view(shape)))


def _affine(bn_weight: Tensor | None, bn_bias: Tensor | None, size: int, like: Tensor
            ) -> tuple[Tensor, Tensor]:
    """The BN's affine, ones and zeros for a BatchNorm without one."""
    return (like.new_ones(size) if bn_weight is None else bn_weight,
            like.new_zeros(size) if bn_bias is None else bn_bias)


def _tile_view(k: int, z: Tensor, gamma: Tensor | None, beta: Tensor | None, stats: Stats):
    """z (N, C * k2, H', W') and its BN (1, C, k2, 1, 1) in the tile view (N, C, k, k, H', W'),
    where both attentions are written."""
    n, c = z.shape[0], z.shape[1] // (k * k)
    z = z.view(n, c, k, k, *z.shape[2:])
    if stats is None:
        return z, None, None, None
    return (z, *(t.view(1, c, k, k, 1, 1) for t in (gamma, beta)),
            tuple(t.view(1, c, k, k, 1, 1) for t in stats))


def _fused(x: Tensor, weight_dw: Tensor, bn_weight: Tensor | None, bn_bias: Tensor | None,
           running_mean: Tensor | None, running_var: Tensor | None, weight: Tensor,
           bias: Tensor | None, stride: int, training: bool, momentum: float, eps: float,
           run: Callable[[Tensor, dict], Tensor]) -> Tensor:
    """``run(x, operands)`` through the fused operators: the operands in the ops' dtype, the
    BN statistics (the batch's from ``attnconv::rfa_feature_stats``, the running ones updated
    as nn.BatchNorm2d does). bf16/fp16 (and autocast) compute in float32 (statistics and
    softmax need it; the GEMM is a small part of the cost) and answer in the autocast dtype,
    like the convolutions they replace."""
    # under torch.compile the operators are there or the caller did not ask for them
    reason = None if torch.compiler.is_compiling() else ops.ensure_loaded()
    if reason is not None:
        raise RuntimeError(f"the fused RFA operators are not available: {reason}")
    out_dtype = x.dtype
    if torch.is_autocast_enabled(x.device.type):
        out_dtype = torch.get_autocast_dtype(x.device.type)
    dtype = torch.promote_types(x.dtype, weight.dtype)
    if dtype in LOW_PRECISION:
        dtype = torch.float32
    with torch.autocast(x.device.type, enabled=False):
        xc = x.to(dtype).contiguous(memory_format=torch.channels_last)
        weight_dw = weight_dw.to(dtype)
        size = weight_dw.shape[0]
        gamma, beta = _affine(bn_weight, bn_bias, size, weight_dw)
        if training:
            with torch.no_grad():
                mean, var = ops.rfa_feature_stats(xc.detach(), weight_dw.detach(), stride)
            if running_mean is not None:
                _update_running_stats(running_mean, running_var, mean, var, momentum,
                                      _count(xc, weight_dw.shape[-1], stride))
        else:
            mean, var = running_mean.to(dtype), running_var.to(dtype)
        operands = {"weight_dw": weight_dw, "gamma": gamma.to(dtype), "beta": beta.to(dtype),
                    "mean": mean, "var": var, "weight": weight.to(dtype),
                    "bias": None if bias is None else bias.to(dtype)}
        out = run(xc, operands)
    out = out if out.dtype == out_dtype else out.to(out_dtype)
    return _keep_memory_format(x, out)


def _count(x: Tensor, k: int, s: int) -> int:
    """The values per feature channel the batch statistics are taken over."""
    return x.shape[0] * ops.rfa._out_size(x.shape[2], k, s) * ops.rfa._out_size(x.shape[3], k, s)


@torch.no_grad()
def _update_running_stats(running_mean: Tensor, running_var: Tensor, mean: Tensor,
                          var: Tensor, momentum: float, count: int) -> None:
    """nn.BatchNorm2d's running-statistics update (unbiased variance), in the buffers' dtype."""
    running_mean.lerp_(mean.to(running_mean.dtype), momentum)
    running_var.lerp_((var * (count / max(count - 1, 1))).to(running_var.dtype), momentum)


# --- the fused operators' autograd formulas ----------------------------------------------------
#
# Registered here, beside the eager formulation they fall back on: the C++ backward passes are
# not themselves differentiable, so a backward that autograd records (create_graph=True, for a
# second derivative) differentiates the eager formulation on the operators' own operands.

def _rfa_setup(ctx, inputs, output):
    (x, weight_dw, gamma, beta, mean, var, logit_scale, weight, bias, stride, batch_stats,
     eps) = inputs
    ctx.save_for_backward(x, weight_dw, gamma, beta, mean, var, logit_scale, weight, bias)
    ctx.args = (stride, batch_stats, eps)


def _rfa_backward(ctx, grad_out):
    x, weight_dw, gamma, beta, mean, var, logit_scale, weight, bias = ctx.saved_tensors
    stride, batch_stats, eps = ctx.args
    needs = ctx.needs_input_grad
    if torch.is_grad_enabled():  # a second derivative is wanted: through the eager path
        def plain(x, weight_dw, gamma, beta, logit_scale, weight, bias):
            return rfa_conv2d(x, weight_dw, gamma, beta, None if batch_stats else mean,
                              None if batch_stats else var, logit_scale, weight, bias, stride,
                              training=batch_stats, momentum=0.0, eps=eps)

        grads = recompute_backward(
            (*needs[:4], needs[6], needs[7], needs[8] and bias is not None), plain,
            (x, weight_dw, gamma, beta, logit_scale, weight, bias), grad_out)
    else:
        grads = ops.rfa.rfa_fused_backward(grad_out, x, weight_dw, gamma, beta, mean, var,
                                              logit_scale, weight, bias is not None, stride,
                                              batch_stats, eps)
    dx, dweight_dw, dgamma, dbeta, dlogit, dweight, dbias = grads
    return (dx, dweight_dw, dgamma, dbeta, None, None, dlogit, dweight,
            dbias if bias is not None else None, None, None, None)


def _reduce_setup(ctx, inputs, output):
    x, weight_dw, gamma, beta, mean, var, stride, kind, batch_stats, eps = inputs
    ctx.save_for_backward(x, weight_dw, gamma, beta, mean, var)
    ctx.args = (stride, kind, batch_stats, eps)


def _reduce_backward(ctx, dr1, dr2, du_attend):
    x, weight_dw, gamma, beta, mean, var = ctx.saved_tensors
    stride, kind, batch_stats, eps = ctx.args
    s1, s2 = ops.rfa_tile._reduce_shapes(x, weight_dw.shape[-1], stride, kind)
    dr1 = x.new_zeros(s1) if dr1 is None else dr1
    dr2 = x.new_zeros(s2) if dr2 is None else dr2
    if torch.is_grad_enabled():  # a second derivative is wanted: through the eager path
        def plain(*t):
            g = tile_features(*t[:4], mean, var, stride, batch_stats, eps)
            return tile_reductions(g, kind), t

        grads = recompute_backward(ctx.needs_input_grad[:4], plain,
                                   (x, weight_dw, gamma, beta), (dr1, dr2))
    else:
        # (under create_graph the attend op took its whole gradient itself: du_attend None)
        grads = ops.rfa_tile.rfa_tile_reduce_backward(
            dr1, dr2, du_attend, x, weight_dw, gamma, beta, mean, var, stride, kind,
            batch_stats, eps)
    return (*grads, None, None, None, None, None, None)


def _attend_setup(ctx, inputs, output):
    (x, weight_dw, gamma, beta, mean, var, f1, f2, weight, bias, _handle, stride, kind,
     batch_stats, eps) = inputs
    ctx.save_for_backward(x, weight_dw, gamma, beta, mean, var, f1, f2, weight, bias)
    ctx.args = (stride, kind, batch_stats, eps)


def _attend_backward(ctx, grad_out):
    x, weight_dw, gamma, beta, mean, var, f1, f2, weight, bias = ctx.saved_tensors
    stride, kind, batch_stats, eps = ctx.args
    needs = ctx.needs_input_grad
    if torch.is_grad_enabled():  # a second derivative is wanted: through the eager path
        def plain(x, weight_dw, gamma, beta, f1, f2, weight, bias):
            g = tile_features(x, weight_dw, gamma, beta, mean, var, stride, batch_stats, eps)
            return attended_pointwise_reference(
                g, *tile_factors(f1, f2, kind), weight.reshape(weight.shape[0], -1, 1, 1), bias)

        grads = recompute_backward(
            (*needs[:4], *needs[6:9], needs[9] and bias is not None), plain,
            (x, weight_dw, gamma, beta, f1, f2, weight, bias), grad_out)
        du = None
    else:
        # with a handle from rfa_tile_reduce in the graph, that op's backward runs the BN +
        # depthwise backward for both (it is linear in dL/du): hand it this op's dL/du
        defer = needs[10]
        *grads, du = ops.rfa_tile.rfa_tile_attend_backward(
            grad_out, x, weight_dw, gamma, beta, mean, var, f1, f2, weight, bias is not None,
            stride, kind, batch_stats, defer, eps)
        if defer:
            grads[:4] = [None] * 4
        else:
            du = None
    dx, dweight_dw, dgamma, dbeta, df1, df2, dweight, dbias = grads
    return (dx, dweight_dw, dgamma, dbeta, None, None, df1, df2, dweight,
            dbias if bias is not None else None, du, None, None, None, None)


def _register_autograd() -> None:
    torch.library.register_autograd("attnconv::rfa_fused", _rfa_backward,
                                    setup_context=_rfa_setup)
    torch.library.register_autograd("attnconv::rfa_tile_reduce", _reduce_backward,
                                    setup_context=_reduce_setup)
    torch.library.register_autograd("attnconv::rfa_tile_attend", _attend_backward,
                                    setup_context=_attend_setup)


ops.rfa.on_load(_register_autograd)
