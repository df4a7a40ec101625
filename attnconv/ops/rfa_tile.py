"""Fused RFCBAMConv and RFCAConv: ``torch.ops.attnconv.rfa_tile_reduce`` and
``torch.ops.attnconv.rfa_tile_attend``.

Zhang et al., "RFAConv", arXiv:2304.03198 (RFCBAMConv, RFCAConv; CA: Hou et al.,
arXiv:2103.02907). With g = relu(BN(depthwise_k,s(x))) (tap-major, never stored) both
attentions are a product of two small factors computed from small reductions of g:

    RFCBAM  R = (max_c g, mean_c g)                 each (N, H', W', k2)
            A[p, t, c] = ca[n, c] * sa[p, t]         ca = SE(x), sa = sigmoid(conv3x3(R tiled))
    RFCA    R = (mean over (w', j) of g, mean over (h', i) of g)
                                                    (N, H', k, C) and (N, W', k, C)
            A[p, (i, j), c] = a_h[n, h', i, c] * a_w[n, w', j, c]
    out = conv_1x1(g * A, wt) + bias

``rfa_tile_reduce`` takes R in one pass over tiles of output positions (the BN batch
statistics come first, from :func:`attnconv.ops.rfa.rfa_feature_stats`); the factors are
computed from R by the layers' own small modules in ordinary ops (the layers call the
ops with tensors only); ``rfa_tile_attend`` fuses
features, product and the tile's GEMM (``csrc/rfa_fused.cpp``, the RFAConv kernel's tiling and
backward passes). Each op keeps only x for backward and recomputes the features; each one's
backward carries its own share of the BN backward (which is linear in dL/d(BN output), so the
two shares add up to the whole). A backward with ``create_graph=True`` recomputes through the
eager formulations :func:`tile_reduce_eager` / :func:`tile_attend_eager`, as ``rfa_fused``
does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from attnconv.ops.rfa import _out_size, tap_features_eager

__all__ = ["rfa_tile_attend", "rfa_tile_reduce", "tile_attend_eager", "tile_reduce_eager"]


def _reduce_shapes(x: Tensor, k: int, s: int, kind: int) -> tuple[tuple[int, ...], ...]:
    n, c, h, w = x.shape
    ho, wo = _out_size(h, k, s), _out_size(w, k, s)
    if kind == 0:
        return (n, ho, wo, k * k), (n, ho, wo, k * k)
    return (n, ho, k, c), (n, wo, k, c)


# --- the operators (schemas and CPU kernels in csrc/rfa_fused.cpp) ---------------------------

def rfa_tile_reduce(x: Tensor, wdt: Tensor, gamma: Tensor, beta: Tensor, mean: Tensor,
                    inv_std: Tensor, kernel_size: int, stride: int, kind: int,
                    batch_stats: bool, eps: float) -> tuple[Tensor, Tensor]:
    """The reductions R of g the factors are computed from (shapes in the module docstring;
    kind 0 RFCBAM, 1 RFCA); the other arguments as in ``rfa_fused``."""
    return torch.ops.attnconv.rfa_tile_reduce(x, wdt, gamma, beta, mean, inv_std, kernel_size,
                                              stride, kind, batch_stats, eps)


def rfa_tile_reduce_backward(dr1: Tensor, dr2: Tensor, x: Tensor, wdt: Tensor, gamma: Tensor,
                             beta: Tensor, mean: Tensor, inv_std: Tensor, kernel_size: int,
                             stride: int, kind: int, batch_stats: bool) -> list[Tensor]:
    """Gradients of :func:`rfa_tile_reduce` w.r.t. x, wdt, gamma, beta."""
    return torch.ops.attnconv.rfa_tile_reduce_backward(dr1, dr2, x, wdt, gamma, beta, mean,
                                                       inv_std, kernel_size, stride, kind,
                                                       batch_stats)


def rfa_tile_attend(x: Tensor, wdt: Tensor, gamma: Tensor, beta: Tensor, mean: Tensor,
                    inv_std: Tensor, f1: Tensor, f2: Tensor, wt: Tensor, bias: Tensor | None,
                    kernel_size: int, stride: int, kind: int, batch_stats: bool,
                    eps: float) -> Tensor:
    """conv_1x1(g * A(f1, f2), wt) + bias, (N, O, H', W') channels-last; kind 0: f1 the
    channel gate (N, C), f2 the spatial gate (N, H', W', k2); kind 1: f1 = a_h (N, H', k, C),
    f2 = a_w (N, W', k, C)."""
    return torch.ops.attnconv.rfa_tile_attend(x, wdt, gamma, beta, mean, inv_std, f1, f2, wt,
                                              bias, kernel_size, stride, kind, batch_stats, eps)


def rfa_tile_attend_backward(grad_out: Tensor, x: Tensor, wdt: Tensor, gamma: Tensor,
                             beta: Tensor, mean: Tensor, inv_std: Tensor, f1: Tensor,
                             f2: Tensor, wt: Tensor, has_bias: bool, kernel_size: int,
                             stride: int, kind: int, batch_stats: bool) -> list[Tensor]:
    """Gradients of :func:`rfa_tile_attend` w.r.t. x, wdt, gamma, beta, f1, f2, wt, bias (the
    last empty without bias)."""
    return torch.ops.attnconv.rfa_tile_attend_backward(
        grad_out, x, wdt, gamma, beta, mean, inv_std, f1, f2, wt, has_bias, kernel_size, stride,
        kind, batch_stats)


def _reduce_fake(x, wdt, gamma, beta, mean, inv_std, kernel_size, stride, kind, batch_stats, eps):
    s1, s2 = _reduce_shapes(x, kernel_size, stride, kind)
    return x.new_empty(s1), x.new_empty(s2)


def _reduce_backward_fake(dr1, dr2, x, wdt, gamma, beta, mean, inv_std, kernel_size, stride,
                          kind, batch_stats):
    return [x.new_empty(x.shape).contiguous(memory_format=torch.channels_last),
            x.new_empty(wdt.shape), x.new_empty(gamma.shape), x.new_empty(beta.shape)]


def _reduce_setup(ctx, inputs, output):
    x, wdt, gamma, beta, mean, inv_std, kernel_size, stride, kind, batch_stats, eps = inputs
    ctx.save_for_backward(x, wdt, gamma, beta, mean, inv_std)
    ctx.args = (kernel_size, stride, kind, batch_stats, eps)


def _reduce_backward(ctx, dr1, dr2):
    x, wdt, gamma, beta, mean, inv_std = ctx.saved_tensors
    kernel_size, stride, kind, batch_stats, eps = ctx.args
    s1, s2 = _reduce_shapes(x, kernel_size, stride, kind)
    dr1 = x.new_zeros(s1) if dr1 is None else dr1
    dr2 = x.new_zeros(s2) if dr2 is None else dr2
    if torch.is_grad_enabled():  # a second derivative is wanted: through the eager path
        names = ["x", "wdt", "gamma", "beta"]
        grads = _eager_grads(
            lambda t: tile_reduce_eager(t["x"], t["wdt"], t["gamma"], t["beta"],
                                        None if batch_stats else mean,
                                        None if batch_stats else inv_std, kernel_size, stride,
                                        kind, eps),
            dict(zip(names, (x, wdt, gamma, beta), strict=True)), ctx.needs_input_grad[:4],
            (dr1, dr2))
        return (*grads, None, None, None, None, None, None, None)
    dx, dwdt, dgamma, dbeta = rfa_tile_reduce_backward(
        dr1, dr2, x, wdt, gamma, beta, mean, inv_std, kernel_size, stride, kind, batch_stats)
    return dx, dwdt, dgamma, dbeta, None, None, None, None, None, None, None


def _attend_fake(x, wdt, gamma, beta, mean, inv_std, f1, f2, wt, bias, kernel_size, stride,
                 kind, batch_stats, eps):
    n, _, h, w = x.shape
    size = (n, wt.shape[0], _out_size(h, kernel_size, stride), _out_size(w, kernel_size, stride))
    return x.new_empty(size).contiguous(memory_format=torch.channels_last)


def _attend_backward_fake(grad_out, x, wdt, gamma, beta, mean, inv_std, f1, f2, wt, has_bias,
                          kernel_size, stride, kind, batch_stats):
    return [x.new_empty(x.shape).contiguous(memory_format=torch.channels_last),
            x.new_empty(wdt.shape), x.new_empty(gamma.shape), x.new_empty(beta.shape),
            x.new_empty(f1.shape), x.new_empty(f2.shape), x.new_empty(wt.shape),
            x.new_empty(wt.shape[0] if has_bias else 0)]


def _attend_setup(ctx, inputs, output):
    (x, wdt, gamma, beta, mean, inv_std, f1, f2, wt, bias, kernel_size, stride, kind,
     batch_stats, eps) = inputs
    ctx.save_for_backward(x, wdt, gamma, beta, mean, inv_std, f1, f2, wt, bias)
    ctx.args = (kernel_size, stride, kind, batch_stats, eps)


def _attend_backward(ctx, grad_out):
    x, wdt, gamma, beta, mean, inv_std, f1, f2, wt, bias = ctx.saved_tensors
    kernel_size, stride, kind, batch_stats, eps = ctx.args
    needs = ctx.needs_input_grad
    if torch.is_grad_enabled():  # a second derivative is wanted: through the eager path
        names = ["x", "wdt", "gamma", "beta", "f1", "f2", "wt", "bias"]
        values = (x, wdt, gamma, beta, f1, f2, wt, bias)
        wanted = (*needs[:4], *needs[6:10])
        gx, gw, gg, gb, g1, g2, gwt, gbias = _eager_grads(
            lambda t: tile_attend_eager(t["x"], t["wdt"], t["gamma"], t["beta"],
                                        None if batch_stats else mean,
                                        None if batch_stats else inv_std, t["f1"], t["f2"],
                                        t["wt"], t["bias"], kernel_size, stride, kind, eps),
            dict(zip(names, values, strict=True)), wanted, (grad_out,))
        return (gx, gw, gg, gb, None, None, g1, g2, gwt, gbias, None, None, None, None, None)
    dx, dwdt, dgamma, dbeta, df1, df2, dwt, dbias = rfa_tile_attend_backward(
        grad_out, x, wdt, gamma, beta, mean, inv_std, f1, f2, wt, bias is not None,
        kernel_size, stride, kind, batch_stats)
    return (dx, dwdt, dgamma, dbeta, None, None, df1, df2, dwt,
            dbias if bias is not None else None, None, None, None, None, None)


def _register_python_parts() -> None:
    torch.library.register_fake("attnconv::rfa_tile_reduce", _reduce_fake)
    torch.library.register_fake("attnconv::rfa_tile_reduce_backward", _reduce_backward_fake)
    torch.library.register_fake("attnconv::rfa_tile_attend", _attend_fake)
    torch.library.register_fake("attnconv::rfa_tile_attend_backward", _attend_backward_fake)
    torch.library.register_autograd("attnconv::rfa_tile_reduce", _reduce_backward,
                                    setup_context=_reduce_setup)
    torch.library.register_autograd("attnconv::rfa_tile_attend", _attend_backward,
                                    setup_context=_attend_setup)


def _eager_grads(fn, inputs: dict, needs, grad_outputs) -> list[Tensor | None]:
    """Gradients (with a graph) of ``fn(inputs)`` w.r.t. the inputs whose ``needs`` is set,
    None for the others."""
    wanted = [name for (name, t), need in zip(inputs.items(), needs, strict=True)
              if need and t is not None]
    with torch.enable_grad():
        # a fresh alias per input: the gradient w.r.t. x itself would also count the paths
        # from out through f1/f2's own history back to x (f depends on x through the
        # reduction), which autograd already follows outside this function
        leaves = {k: (None if v is None else v.view_as(v) if k in wanted else v.detach())
                  for k, v in inputs.items()}
        out = fn(leaves)
        out = out if isinstance(out, tuple) else (out,)
        grads = torch.autograd.grad(out, [leaves[k] for k in wanted], grad_outputs,
                                    create_graph=True, allow_unused=True)
    got = dict(zip(wanted, grads, strict=True))
    return [got.get(name) for name in inputs]


# --- the same functions in plain ops ---------------------------------------------------------

def tile_reduce_eager(x: Tensor, wdt: Tensor, gamma: Tensor, beta: Tensor, mean: Tensor | None,
                      inv_std: Tensor | None, kernel_size: int, stride: int, kind: int,
                      eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """:func:`rfa_tile_reduce` in differentiable ops (``mean`` None: batch statistics)."""
    g = F.relu(tap_features_eager(x, wdt, gamma, beta, mean, inv_std, kernel_size, stride, eps))
    if kind == 0:  # (N, k2, C, H', W') -> (N, H', W', k2)
        return (g.max(dim=2)[0].permute(0, 2, 3, 1), g.mean(dim=2).permute(0, 2, 3, 1))
    n, _, c, h, w = g.shape
    k = kernel_size
    g = g.reshape(n, k, k, c, h, w)  # (N, i, j, C, H', W')
    return g.mean(dim=(2, 5)).permute(0, 3, 1, 2), g.mean(dim=(1, 4)).permute(0, 3, 1, 2)


def _attention_eager(f1: Tensor, f2: Tensor, k: int, kind: int) -> Tensor:
    """A (N, k2, C, H', W') from the factors."""
    if kind == 0:
        return f1[:, None, :, None, None] * f2.permute(0, 3, 1, 2).unsqueeze(2)
    n, h, _, c = f1.shape
    w = f2.shape[1]
    a_h = f1.permute(0, 2, 3, 1).reshape(n, k, 1, c, h, 1)
    a_w = f2.permute(0, 2, 3, 1).reshape(n, 1, k, c, 1, w)
    return (a_h * a_w).reshape(n, k * k, c, h, w)


def tile_attend_eager(x: Tensor, wdt: Tensor, gamma: Tensor, beta: Tensor, mean: Tensor | None,
                      inv_std: Tensor | None, f1: Tensor, f2: Tensor, wt: Tensor,
                      bias: Tensor | None, kernel_size: int, stride: int, kind: int,
                      eps: float = 1e-5) -> Tensor:
    """:func:`rfa_tile_attend` in differentiable ops (``mean`` None: batch statistics)."""
    g = F.relu(tap_features_eager(x, wdt, gamma, beta, mean, inv_std, kernel_size, stride, eps))
    n, k2, c, h, w = g.shape
    attended = (g * _attention_eager(f1, f2, kernel_size, kind)).reshape(n, k2 * c, h, w)
    return F.conv2d(attended, wt.view(*wt.shape, 1, 1), bias)
