"""Fused RFCBAMConv and RFCAConv: ``torch.ops.attnconv.rfa_tile_reduce`` and
``torch.ops.attnconv.rfa_tile_attend``.

Zhang et al., "RFAConv", arXiv:2304.03198 (RFCBAMConv, RFCAConv; CA: Hou et al.,
arXiv:2103.02907). With g = relu(BN(depthwise_k,s(x))) (never stored) both
attentions are a product of two small factors computed from small reductions of g:

    RFCBAM  R = (max_c g, mean_c g)                 each (N, H', W', k2)
            A[p, t, c] = ca[n, c] * sa[p, t]         ca = SE(x), sa = sigmoid(conv3x3(R tiled))
    RFCA    R = (mean over (w', j) of g, mean over (h', i) of g)
                                                    (N, H', k, C) and (N, W', k, C)
            A[p, (i, j), c] = a_h[n, h', i, c] * a_w[n, w', j, c]
    out = conv_1x1(g * A, wt) + bias

``rfa_tile_reduce`` takes R in one pass over tiles of output positions (the BN batch
statistics come first, from :func:`attnconv.ops.rfa.rfa_feature_stats`); the factors are
computed from R by the layers' own small modules in ordinary ops
(:func:`attnconv.functional.rfa.rfa_tile_conv2d` calls the ops with the layers' tensors as
the modules hold them); ``rfa_tile_attend`` fuses
features, product and the tile's GEMM (``csrc/rfa_fused.cpp``, the RFAConv kernel's tiling and
backward passes). Each op keeps only x for backward and recomputes the features; each one's
backward carries its own share of the BN backward (which is linear in dL/d(BN output), so the
two shares add up to the whole): with the handle of ``rfa_tile_reduce`` in the graph, the
attend op's backward hands its share to the reduce op's, which runs that part once for both.
The autograd formulas are registered by :mod:`attnconv.functional.rfa`, as ``rfa_fused``'s.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnconv.ops.rfa import _out_size, on_load

__all__ = ["rfa_tile_attend", "rfa_tile_reduce"]


def _reduce_shapes(x: Tensor, k: int, s: int, kind: int) -> tuple[tuple[int, ...], ...]:
    n, c, h, w = x.shape
    ho, wo = _out_size(h, k, s), _out_size(w, k, s)
    if kind == 0:
        return (n, ho, wo, k * k), (n, ho, wo, k * k)
    return (n, ho, k, c), (n, wo, k, c)


# --- the operators (schemas and CPU kernels in csrc/rfa_fused.cpp) ---------------------------

def rfa_tile_reduce(x: Tensor, weight_dw: Tensor, gamma: Tensor, beta: Tensor, mean: Tensor,
                    var: Tensor, stride: int, kind: int, batch_stats: bool,
                    eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """The reductions R of g the factors are computed from (shapes in the module docstring;
    kind 0 RFCBAM, 1 RFCA), and a handle for :func:`rfa_tile_attend` (an (N, H', W', C k2)
    tensor that takes no memory); the other arguments as in ``rfa_fused``."""
    return torch.ops.attnconv.rfa_tile_reduce(x, weight_dw, gamma, beta, mean, var, stride,
                                              kind, batch_stats, eps)


def rfa_tile_reduce_backward(dr1: Tensor, dr2: Tensor, du_attend: Tensor | None, x: Tensor,
                             weight_dw: Tensor, gamma: Tensor, beta: Tensor, mean: Tensor,
                             var: Tensor, stride: int, kind: int, batch_stats: bool,
                             eps: float) -> list[Tensor]:
    """Gradients of :func:`rfa_tile_reduce` w.r.t. x, weight_dw, gamma, beta, with
    :func:`rfa_tile_attend`'s deferred share of dL/du (the handle's gradient) added in."""
    return torch.ops.attnconv.rfa_tile_reduce_backward(dr1, dr2, du_attend, x, weight_dw, gamma,
                                                       beta, mean, var, stride, kind,
                                                       batch_stats, eps)


def rfa_tile_attend(x: Tensor, weight_dw: Tensor, gamma: Tensor, beta: Tensor, mean: Tensor,
                    var: Tensor, f1: Tensor, f2: Tensor, weight: Tensor, bias: Tensor | None,
                    handle: Tensor | None, stride: int, kind: int, batch_stats: bool,
                    eps: float) -> Tensor:
    """conv_1x1(g * A(f1, f2), weight) + bias, (N, O, H', W') channels-last; kind 0: f1 the
    channel gate (N, C), f2 the spatial gate (N, H', W', k2); kind 1: f1 = a_h (N, H', k, C),
    f2 = a_w (N, W', k, C). ``handle``: :func:`rfa_tile_reduce`'s third output, or None; given,
    this op's backward leaves the BN and depthwise backward to that op's, which does it once
    for both (the output does not depend on it)."""
    return torch.ops.attnconv.rfa_tile_attend(x, weight_dw, gamma, beta, mean, var, f1, f2,
                                              weight, bias, handle, stride, kind, batch_stats,
                                              eps)


def rfa_tile_attend_backward(grad_out: Tensor, x: Tensor, weight_dw: Tensor, gamma: Tensor,
                             beta: Tensor, mean: Tensor, var: Tensor, f1: Tensor, f2: Tensor,
                             weight: Tensor, has_bias: bool, stride: int, kind: int,
                             batch_stats: bool, defer_tail: bool, eps: float) -> list[Tensor]:
    """Gradients of :func:`rfa_tile_attend` w.r.t. x, weight_dw, gamma, beta, f1, f2, weight,
    bias (empty without bias) and dL/du (N, H', W', C k2); with ``defer_tail`` the first four
    are empty and dL/du is there, for :func:`rfa_tile_reduce_backward`; else dL/du is empty."""
    return torch.ops.attnconv.rfa_tile_attend_backward(
        grad_out, x, weight_dw, gamma, beta, mean, var, f1, f2, weight, has_bias, stride, kind,
        batch_stats, defer_tail, eps)


def _handle_shape(x: Tensor, weight_dw: Tensor, stride: int) -> tuple[int, ...]:
    n, _, h, w = x.shape
    k = weight_dw.shape[-1]
    return n, _out_size(h, k, stride), _out_size(w, k, stride), weight_dw.shape[0]


def _reduce_fake(x, weight_dw, gamma, beta, mean, var, stride, kind, batch_stats, eps):
    s1, s2 = _reduce_shapes(x, weight_dw.shape[-1], stride, kind)
    handle = x.new_zeros(1, 1, 1, 1).expand(_handle_shape(x, weight_dw, stride))
    return x.new_empty(s1), x.new_empty(s2), handle


def _reduce_backward_fake(dr1, dr2, du_attend, x, weight_dw, gamma, beta, mean, var, stride,
                          kind, batch_stats, eps):
    return [x.new_empty(x.shape).contiguous(memory_format=torch.channels_last),
            x.new_empty(weight_dw.shape), x.new_empty(gamma.shape), x.new_empty(beta.shape)]


def _attend_fake(x, weight_dw, gamma, beta, mean, var, f1, f2, weight, bias, handle, stride,
                 kind, batch_stats, eps):
    n, _, h, w = x.shape
    k = weight_dw.shape[-1]
    size = (n, weight.shape[0], _out_size(h, k, stride), _out_size(w, k, stride))
    return x.new_empty(size).contiguous(memory_format=torch.channels_last)


def _attend_backward_fake(grad_out, x, weight_dw, gamma, beta, mean, var, f1, f2, weight,
                          has_bias, stride, kind, batch_stats, defer_tail, eps):
    tail = [x.new_empty(x.shape).contiguous(memory_format=torch.channels_last),
            x.new_empty(weight_dw.shape), x.new_empty(gamma.shape), x.new_empty(beta.shape)]
    if defer_tail:
        tail = [x.new_empty(0) for _ in range(4)]
    return [*tail, x.new_empty(f1.shape), x.new_empty(f2.shape), x.new_empty(weight.shape),
            x.new_empty(weight.shape[0] if has_bias else 0),
            x.new_empty(_handle_shape(x, weight_dw, stride) if defer_tail else 0)]


@on_load
def _register_python_parts() -> None:
    torch.library.register_fake("attnconv::rfa_tile_reduce", _reduce_fake)
    torch.library.register_fake("attnconv::rfa_tile_reduce_backward", _reduce_backward_fake)
    torch.library.register_fake("attnconv::rfa_tile_attend", _attend_fake)
    torch.library.register_fake("attnconv::rfa_tile_attend_backward", _attend_backward_fake)
