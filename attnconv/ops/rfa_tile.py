"""Fused RFCBAMConv and RFCAConv (issue 13): ``torch.ops.attnconv.rfa_tile_reduce`` and
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
computed from R by the layers' own small modules in ordinary ops; ``rfa_tile_attend`` fuses
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

from attnconv.ops.rfa import (
    _extension,
    _out_size,
    layer_operands,
    tap_features_eager,
    tile_positions,
)

__all__ = ["TILE_KINDS", "rfa_tile_attend", "rfa_tile_reduce", "tile_attend_eager",
           "tile_layer_forward", "tile_reduce_eager"]

#: the attention kinds the kernel knows, by layer
TILE_KINDS = {"RFCBAMConv2d": 0, "RFCAConv2d": 1}


def _scale_shift(gamma: Tensor, beta: Tensor, mean: Tensor, inv_std: Tensor):
    scale = gamma * inv_std
    return scale.contiguous(), (beta - mean * scale).contiguous()


def _positions(x: Tensor, k: int, s: int) -> int:
    return x.shape[0] * _out_size(x.shape[2], k, s) * _out_size(x.shape[3], k, s)


def _reduce_shapes(x: Tensor, k: int, s: int, kind: int) -> tuple[tuple[int, ...], ...]:
    n, c, h, w = x.shape
    ho, wo = _out_size(h, k, s), _out_size(w, k, s)
    if kind == 0:
        return (n, ho, wo, k * k), (n, ho, wo, k * k)
    return (n, ho, k, c), (n, wo, k, c)


# --- the reductions --------------------------------------------------------------------------

@torch.library.custom_op("attnconv::rfa_tile_reduce", mutates_args=())
def rfa_tile_reduce(x: Tensor, wdt: Tensor, gamma: Tensor, beta: Tensor, mean: Tensor,
                    inv_std: Tensor, kernel_size: int, stride: int, kind: int,
                    batch_stats: bool, eps: float) -> tuple[Tensor, Tensor]:
    """The reductions R of g the factors are computed from (shapes in the module docstring;
    kind 0 RFCBAM, 1 RFCA); the other arguments as in ``rfa_fused``."""
    scale, shift = _scale_shift(gamma, beta, mean, inv_std)
    tile = tile_positions(wdt.shape[1] * wdt.shape[2], x.element_size(),
                          _positions(x, kernel_size, stride), 1)
    r1, r2 = _extension().tile_reduce(x.contiguous(memory_format=torch.channels_last),
                                      wdt.contiguous(), scale, shift, kernel_size, stride, kind,
                                      tile)
    s1, s2 = _reduce_shapes(x, kernel_size, stride, kind)
    return r1.view(s1), r2.view(s2)


@rfa_tile_reduce.register_fake
def _(x, wdt, gamma, beta, mean, inv_std, kernel_size, stride, kind, batch_stats, eps):
    s1, s2 = _reduce_shapes(x, kernel_size, stride, kind)
    return x.new_empty(s1), x.new_empty(s2)


@torch.library.custom_op("attnconv::rfa_tile_reduce_backward", mutates_args=())
def rfa_tile_reduce_backward(dr1: Tensor, dr2: Tensor, x: Tensor, wdt: Tensor, gamma: Tensor,
                             beta: Tensor, mean: Tensor, inv_std: Tensor, kernel_size: int,
                             stride: int, kind: int, batch_stats: bool) -> list[Tensor]:
    """Gradients of :func:`rfa_tile_reduce` w.r.t. x, wdt, gamma, beta."""
    tile = tile_positions(wdt.shape[1] * wdt.shape[2], x.element_size(),
                          _positions(x, kernel_size, stride), 2)
    return _extension().tile_reduce_backward(
        dr1.contiguous(), dr2.contiguous(), x.contiguous(memory_format=torch.channels_last),
        wdt.contiguous(), gamma.contiguous(), beta.contiguous(), mean.contiguous(),
        inv_std.contiguous(), kernel_size, stride, kind, batch_stats, tile)


@rfa_tile_reduce_backward.register_fake
def _(dr1, dr2, x, wdt, gamma, beta, mean, inv_std, kernel_size, stride, kind, batch_stats):
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


rfa_tile_reduce.register_autograd(_reduce_backward, setup_context=_reduce_setup)


# --- the product with the factors and the GEMM -----------------------------------------------

@torch.library.custom_op("attnconv::rfa_tile_attend", mutates_args=())
def rfa_tile_attend(x: Tensor, wdt: Tensor, gamma: Tensor, beta: Tensor, mean: Tensor,
                    inv_std: Tensor, f1: Tensor, f2: Tensor, wt: Tensor, bias: Tensor | None,
                    kernel_size: int, stride: int, kind: int, batch_stats: bool,
                    eps: float) -> Tensor:
    """conv_1x1(g * A(f1, f2), wt) + bias, (N, O, H', W') channels-last; kind 0: f1 the
    channel gate (N, C), f2 the spatial gate (N, H', W', k2); kind 1: f1 = a_h (N, H', k, C),
    f2 = a_w (N, W', k, C)."""
    scale, shift = _scale_shift(gamma, beta, mean, inv_std)
    tile = tile_positions(wt.shape[1], x.element_size(), _positions(x, kernel_size, stride), 1)
    return _extension().tile_attend(
        x.contiguous(memory_format=torch.channels_last), wdt.contiguous(), scale, shift,
        f1.contiguous(), f2.contiguous(), wt.contiguous(), bias, kernel_size, stride, kind, tile)


@rfa_tile_attend.register_fake
def _(x, wdt, gamma, beta, mean, inv_std, f1, f2, wt, bias, kernel_size, stride, kind,
      batch_stats, eps):
    n, _, h, w = x.shape
    size = (n, wt.shape[0], _out_size(h, kernel_size, stride), _out_size(w, kernel_size, stride))
    return x.new_empty(size).contiguous(memory_format=torch.channels_last)


@torch.library.custom_op("attnconv::rfa_tile_attend_backward", mutates_args=())
def rfa_tile_attend_backward(grad_out: Tensor, x: Tensor, wdt: Tensor, gamma: Tensor,
                             beta: Tensor, mean: Tensor, inv_std: Tensor, f1: Tensor,
                             f2: Tensor, wt: Tensor, has_bias: bool, kernel_size: int,
                             stride: int, kind: int, batch_stats: bool) -> list[Tensor]:
    """Gradients of :func:`rfa_tile_attend` w.r.t. x, wdt, gamma, beta, f1, f2, wt, bias (the
    last empty without bias)."""
    tile = tile_positions(wt.shape[1], x.element_size(),
                          grad_out.shape[0] * grad_out.shape[2] * grad_out.shape[3], 3)
    grads = _extension().tile_attend_backward(
        grad_out, x.contiguous(memory_format=torch.channels_last), wdt.contiguous(),
        gamma.contiguous(), beta.contiguous(), mean.contiguous(), inv_std.contiguous(),
        f1.contiguous(), f2.contiguous(), wt.contiguous(), has_bias, kernel_size, stride, kind,
        batch_stats, tile)
    if grads[-1] is None:
        grads[-1] = x.new_empty(0)
    return grads


@rfa_tile_attend_backward.register_fake
def _(grad_out, x, wdt, gamma, beta, mean, inv_std, f1, f2, wt, has_bias, kernel_size, stride,
      kind, batch_stats):
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


rfa_tile_attend.register_autograd(_attend_backward, setup_context=_attend_setup)


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


# --- the layers' forward through the ops -----------------------------------------------------

def _to_tiles(t: Tensor, k: int) -> Tensor:
    """(N, C, k2, H, W) -> (N, C, H*k, W*k), the official rearranged layout."""
    n, c, _, h, w = t.shape
    return t.view(n, c, k, k, h, w).permute(0, 1, 4, 2, 5, 3).reshape(n, c, h * k, w * k)


def _cbam_factors(layer, x: Tensor, r1: Tensor, r2: Tensor) -> tuple[Tensor, Tensor]:
    """RFCBAM's channel gate (N, C) and spatial gate (N, H', W', k2) from max/mean over C."""
    n, h, w, k2 = r1.shape
    k = layer.kernel_size[0]
    pdtype = layer.channel_fc1.weight.dtype
    channel = torch.sigmoid(layer.channel_fc2(F.relu(layer.channel_fc1(
        x.mean((2, 3)).to(pdtype)))))
    pooled = torch.stack([r1, r2], dim=1).permute(0, 1, 4, 2, 3)  # (N, 2, k2, H', W')
    spatial = torch.sigmoid(layer.spatial_conv(_to_tiles(pooled.to(pdtype), k)))
    # (N, 1, H'k, W'k) -> (N, H', W', k2)
    spatial = spatial.view(n, h, k, w, k).permute(0, 1, 3, 2, 4).reshape(n, h, w, k2)
    return channel.to(x.dtype), spatial.to(x.dtype)


def _ca_factors(layer, x: Tensor, r1: Tensor, r2: Tensor) -> tuple[Tensor, Tensor]:
    """RFCA's a_h (N, H', k, C) and a_w (N, W', k, C) from the row and column means."""
    n, h, k, c = r1.shape
    w = r2.shape[1]
    pdtype = layer.coord_conv.weight.dtype
    rows = r1.permute(0, 3, 1, 2).reshape(n, c, h * k, 1)
    cols = r2.permute(0, 3, 1, 2).reshape(n, c, w * k, 1)
    y = F.hardswish(layer.coord_bn(layer.coord_conv(torch.cat([rows, cols], dim=2).to(pdtype))))
    y_h, y_w = torch.split(y, [h * k, w * k], dim=2)
    a_h = torch.sigmoid(layer.coord_conv_h(y_h)).view(n, c, h, k).permute(0, 2, 3, 1)
    a_w = torch.sigmoid(layer.coord_conv_w(y_w)).view(n, c, w, k).permute(0, 2, 3, 1)
    return a_h.to(x.dtype), a_w.to(x.dtype)


def tile_layer_forward(layer, x: Tensor) -> Tensor:
    """``RFCBAMConv2d.forward`` / ``RFCAConv2d.forward`` through the fused ops (x on CPU);
    autocast and half tensors as in :func:`attnconv.ops.rfa.rfa_layer_forward`."""
    out_dtype = x.dtype
    if torch.is_autocast_enabled(x.device.type):
        out_dtype = torch.get_autocast_dtype(x.device.type)
    with torch.autocast(x.device.type, enabled=False):
        out = _tile_layer_forward(layer, x)
    return out if out.dtype == out_dtype else out.to(out_dtype)


def _tile_layer_forward(layer, x: Tensor) -> Tensor:
    kind = TILE_KINDS[type(layer).__name__]
    ops = layer_operands(layer, x)
    # once here rather than in each op (and in each backward)
    x = ops["x"].contiguous(memory_format=torch.channels_last)
    common = (ops["wdt"], ops["gamma"], ops["beta"], ops["mean"], ops["inv_std"])
    k, s, batch_stats, eps = ops["kernel_size"], ops["stride"], ops["batch_stats"], ops["eps"]
    r1, r2 = rfa_tile_reduce(x, *common, k, s, kind, batch_stats, eps)
    f1, f2 = (_cbam_factors if kind == 0 else _ca_factors)(layer, x, r1, r2)
    return rfa_tile_attend(x, *common, f1, f2, ops["wt"], ops["bias"], k, s, kind, batch_stats,
                           eps)
