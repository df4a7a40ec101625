"""The math of the receptive-field attention convs (RFAConv, RFCBAMConv, RFCAConv) as
functions: the tile layout, plain reference formulations and memory-lean autograd Functions.

Zhang et al., "RFAConv: Innovating Spatial Attention and Standard Convolutional Operation",
2023, arXiv:2304.03198. With z = depthwise_k(x) viewed (N, C, k2, H', W') and BN over batch
statistics (or folded into z in eval mode):

    g = ReLU(BN(z))
    RFAConv:          out = conv_1x1(g * softmax_t(m * a), W.reshape(O, C * k2)) + b
    RFCBAM / RFCA:    out = conv_1x1(g * f1 * f2, W.reshape(O, C * k2)) + b

The ``*_reference`` functions are the plain formulations, written with autograd ops only. The
Functions keep only z (k2 / s^2 times the input) for backward and recompute BN, ReLU, the
attention product and the softmax there, instead of autograd's four or five k2-sized tensors.
When autograd records a backward (``create_graph=True``, for a second derivative), the
Functions differentiate the reference formulation instead, so second-order gradients are
exact.

Mixed precision: z, g, the attention product and the final conv run in z's dtype (the
autocast dtype, cast by the layers); BN statistics (``stats``), the softmax logits and the
parameter-gradient sums over the batch run in float32 for fp16/bf16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnconv.functional._common import accumulate_dtype, cast, recompute_backward

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


# --- the entry points the layers call -------------------------------------------------------

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
