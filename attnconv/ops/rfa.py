"""The fused RFAConv operator (issue 13): ``torch.ops.attnconv.rfa_fused``.

Zhang et al., "RFAConv", arXiv:2304.03198. With tap-major features (index t * C + c):

    z = depthwise_k,s(x)                          (N, k2 * C, H', W'), never stored
    out = conv_1x1(relu(BN(z)) * softmax_t(a * avgpool_k,s(x)), wt) + bias

The C++ kernel (``csrc/rfa_fused.cpp``) computes it tile by tile of output positions; training
keeps only ``x`` for backward and recomputes the features per tile. The op is a
``torch.library`` custom op with a fake (meta) implementation and an autograd formula, so
``torch.compile`` treats it as one opaque call. :func:`rfa_eager` is the same function in plain
differentiable ops: the reference, the path on devices the kernel does not cover, and the
second derivative (the C++ backward itself is not differentiable, so a backward with
``create_graph=True`` recomputes through :func:`rfa_eager`).
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from attnconv.ops._build import load_extension

__all__ = [
    "RFA_IMPLS", "fused_available", "get_rfa_impl", "rfa_eager", "rfa_feature_stats", "rfa_fused",
    "rfa_layer_forward", "set_rfa_impl", "tile_positions", "use_fused",
]


def _extension():
    return load_extension("rfa_fused")


def fused_available() -> str | None:
    """None when the C++ kernel is built and loaded, else the reason it is not."""
    ext = _extension()
    return ext if isinstance(ext, str) else None


@functools.cache
def _l2_bytes() -> int:
    """This CPU's per-core L2 size from sysfs (1 MiB when unreadable)."""
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for index in sorted(base.glob("index*")):
        try:
            if (index / "level").read_text().strip() == "2":
                size = (index / "size").read_text().strip()
                unit = {"K": 1 << 10, "M": 1 << 20}.get(size[-1], 1)
                return int(size.rstrip("KM")) * unit
        except (OSError, ValueError):
            continue
    return 1 << 20


def tile_positions(features: int, element_size: int, positions: int, buffers: int) -> int:
    """Output positions per tile: ``buffers`` tile-sized (positions x features) buffers in
    half of this CPU's L2, and at least 4 tiles per thread when the input is small."""
    tile = (_l2_bytes() // 2) // max(1, buffers * features * element_size)
    tile = min(tile, -(-positions // (4 * torch.get_num_threads())))
    return max(1, tile)


# --- the custom ops --------------------------------------------------------------------------

@torch.library.custom_op("attnconv::rfa_feature_stats", mutates_args=())
def rfa_feature_stats(x: Tensor, wdt: Tensor, kernel_size: int, stride: int) -> tuple[Tensor,
                                                                                       Tensor]:
    """Batch mean and biased variance (k2, C) of the depthwise features (no gradient)."""
    k2, _, c = wdt.shape
    tile = tile_positions(k2 * c, x.element_size(), max(1, x.numel() // c), 1)
    return tuple(_extension().rfa_stats(x.contiguous(memory_format=torch.channels_last),
                                        wdt.contiguous(), kernel_size, stride, tile))


@rfa_feature_stats.register_fake
def _(x, wdt, kernel_size, stride):
    k2, _, c = wdt.shape
    return x.new_empty(k2, c), x.new_empty(k2, c)


def _out_size(size: int, k: int, s: int) -> int:
    return (size + 2 * (k // 2) - k) // s + 1


@torch.library.custom_op("attnconv::rfa_fused", mutates_args=())
def rfa_fused(x: Tensor, wdt: Tensor, gamma: Tensor, beta: Tensor, mean: Tensor,
              inv_std: Tensor, a: Tensor, wt: Tensor, bias: Tensor | None, kernel_size: int,
              stride: int, batch_stats: bool, eps: float) -> Tensor:
    """The fused RFAConv; every per-feature tensor is tap-major (k2, C):

    x (N, C, H, W); wdt (k2 conv taps, k2 features, C) the depthwise filters; gamma, beta the
    BN affine; mean, inv_std its statistics (the batch's when ``batch_stats``: their gradient
    is then part of the op's, and ``eps`` the one inside inv_std); a the logit scales;
    wt (O, k2 * C) the final 1x1 conv.
    Returns (N, O, H', W') in channels-last memory format.
    """
    scale = gamma * inv_std
    shift = beta - mean * scale
    positions = x.shape[0] * _out_size(x.shape[2], kernel_size, stride) * _out_size(
        x.shape[3], kernel_size, stride)
    tile = tile_positions(wt.shape[1], x.element_size(), positions, 1)
    return _extension().rfa_forward(
        x.contiguous(memory_format=torch.channels_last), wdt.contiguous(), scale.contiguous(),
        shift.contiguous(), a.contiguous(), wt.contiguous(), bias, kernel_size, stride, tile)


@rfa_fused.register_fake
def _(x, wdt, gamma, beta, mean, inv_std, a, wt, bias, kernel_size, stride, batch_stats, eps):
    n, _, h, w = x.shape
    size = (n, wt.shape[0], _out_size(h, kernel_size, stride), _out_size(w, kernel_size, stride))
    return x.new_empty(size).contiguous(memory_format=torch.channels_last)


@torch.library.custom_op("attnconv::rfa_fused_backward", mutates_args=())
def rfa_fused_backward(grad_out: Tensor, x: Tensor, wdt: Tensor, gamma: Tensor, beta: Tensor,
                       mean: Tensor, inv_std: Tensor, a: Tensor, wt: Tensor, has_bias: bool,
                       kernel_size: int, stride: int, batch_stats: bool) -> list[Tensor]:
    """Gradients of :func:`rfa_fused` w.r.t. x, wdt, gamma, beta, a, wt, bias (the last
    empty without bias)."""
    positions = grad_out.shape[0] * grad_out.shape[2] * grad_out.shape[3]
    tile = tile_positions(wt.shape[1], x.element_size(), positions, 3)
    grads = _extension().rfa_backward(
        grad_out, x.contiguous(memory_format=torch.channels_last), wdt.contiguous(),
        gamma.contiguous(), beta.contiguous(), mean.contiguous(), inv_std.contiguous(),
        a.contiguous(), wt.contiguous(), has_bias, kernel_size, stride, batch_stats, tile)
    if grads[-1] is None:
        grads[-1] = x.new_empty(0)
    return grads


@rfa_fused_backward.register_fake
def _(grad_out, x, wdt, gamma, beta, mean, inv_std, a, wt, has_bias, kernel_size, stride,
      batch_stats):
    # contiguous like the kernel's results, whatever the strides of the (permuted) inputs
    return [x.new_empty(x.shape).contiguous(memory_format=torch.channels_last),
            x.new_empty(wdt.shape), x.new_empty(gamma.shape), x.new_empty(beta.shape),
            x.new_empty(a.shape), x.new_empty(wt.shape),
            x.new_empty(wt.shape[0] if has_bias else 0)]


def _setup_context(ctx, inputs, output):
    x, wdt, gamma, beta, mean, inv_std, a, wt, bias, kernel_size, stride, batch_stats, eps = inputs
    ctx.save_for_backward(x, wdt, gamma, beta, mean, inv_std, a, wt, bias)
    ctx.args = (kernel_size, stride, batch_stats, eps)


def _backward(ctx, grad_out):
    x, wdt, gamma, beta, mean, inv_std, a, wt, bias = ctx.saved_tensors
    kernel_size, stride, batch_stats, eps = ctx.args
    if torch.is_grad_enabled():
        # a second derivative is wanted: differentiate the eager formulation instead
        return _eager_backward(grad_out, x, wdt, gamma, beta, mean, inv_std, a, wt, bias,
                               kernel_size, stride, batch_stats, eps, ctx.needs_input_grad)
    dx, dwdt, dgamma, dbeta, da, dwt, dbias = rfa_fused_backward(
        grad_out, x, wdt, gamma, beta, mean, inv_std, a, wt, bias is not None, kernel_size,
        stride, batch_stats)
    return (dx, dwdt, dgamma, dbeta, None, None, da, dwt, dbias if bias is not None else None,
            None, None, None, None)


rfa_fused.register_autograd(_backward, setup_context=_setup_context)


def _eager_backward(grad_out, x, wdt, gamma, beta, mean, inv_std, a, wt, bias, kernel_size,
                    stride, batch_stats, eps, needs):
    inputs = {"x": x, "wdt": wdt, "gamma": gamma, "beta": beta, "a": a, "wt": wt}
    if bias is not None:
        inputs["bias"] = bias
    wanted = [name for name, need in zip(["x", "wdt", "gamma", "beta", None, None, "a", "wt",
                                          "bias"], needs, strict=False) if name and need
              and name in inputs]
    with torch.enable_grad():
        leaves = {k: (v if k in wanted else v.detach()) for k, v in inputs.items()}
        out = rfa_eager(leaves["x"], leaves["wdt"], leaves["gamma"], leaves["beta"],
                        None if batch_stats else mean, None if batch_stats else inv_std,
                        leaves["a"], leaves["wt"], leaves.get("bias"), kernel_size, stride, eps)
        grads = torch.autograd.grad(out, [leaves[k] for k in wanted], grad_out,
                                    create_graph=True, allow_unused=True)
    got = dict(zip(wanted, grads, strict=True))
    return (got.get("x"), got.get("wdt"), got.get("gamma"), got.get("beta"), None, None,
            got.get("a"), got.get("wt"), got.get("bias"), None, None, None, None)


# --- the same function in plain ops ----------------------------------------------------------

def tap_features_eager(x: Tensor, wdt: Tensor, gamma: Tensor, beta: Tensor,
                       mean: Tensor | None, inv_std: Tensor | None, kernel_size: int,
                       stride: int, eps: float = 1e-5) -> Tensor:
    """BN(depthwise_k,s(x)) before the ReLU, (N, k2, C, H', W') (tap-major), in plain ops;
    arguments as in :func:`rfa_eager`."""
    k2, _, c = wdt.shape
    k = kernel_size
    pad = k // 2
    # depthwise weight in the conv's order: out channel t * C + c <- input channel c
    weight = wdt.permute(1, 2, 0).reshape(k2 * c, 1, k, k)
    # grouped conv wants out channels grouped by input channel: reorder to c * k2 + t and back
    order = torch.arange(k2 * c, device=x.device).view(k2, c).t().reshape(-1)
    z = F.conv2d(x, weight[order], None, stride, pad, groups=c)
    n, _, h, w = z.shape
    z = z.view(n, c, k2, h, w).transpose(1, 2)  # (N, k2, C, H', W')
    if mean is None:
        var, mu = torch.var_mean(z, dim=(0, 3, 4), correction=0)
        inv_std = torch.rsqrt(var + eps)
        mean = mu
    u = (z - mean.view(1, k2, c, 1, 1)) * (inv_std * gamma).view(1, k2, c, 1, 1) + beta.view(
        1, k2, c, 1, 1)
    return u


def rfa_eager(x: Tensor, wdt: Tensor, gamma: Tensor, beta: Tensor, mean: Tensor | None,
              inv_std: Tensor | None, a: Tensor, wt: Tensor, bias: Tensor | None,
              kernel_size: int, stride: int, eps: float = 1e-5) -> Tensor:
    """:func:`rfa_fused` in differentiable ATen ops (any device, any order of derivative).

    ``mean``/``inv_std`` None means batch statistics, computed here (with ``eps``) so that
    autograd differentiates through them.
    """
    k2, _, c = wdt.shape
    k = kernel_size
    pad = k // 2
    u = tap_features_eager(x, wdt, gamma, beta, mean, inv_std, kernel_size, stride, eps)
    n, _, _, h, w = u.shape
    pooled = F.avg_pool2d(x, k, stride, pad, count_include_pad=True).unsqueeze(1)
    attn = torch.softmax(a.view(1, k2, c, 1, 1) * pooled, dim=1)
    attended = (F.relu(u) * attn).reshape(n, k2 * c, h, w)
    return F.conv2d(attended, wt.view(*wt.shape, 1, 1), bias)


# --- the layer's forward through the op --------------------------------------------------------

def _tap_major(t: Tensor, c: int, k2: int) -> Tensor:
    """A per-feature tensor in the layer's order c * k2 + t -> (k2, C)."""
    return t.reshape(c, k2).t()


def rfa_layer_forward(layer, x: Tensor) -> Tensor:
    """``RFAConv2d.forward`` through :func:`rfa_fused` (``layer`` an RFAConv2d, x on CPU).

    Converts the parameters to tap-major order with differentiable ops (their gradients reach
    the layer's parameters), takes the BN batch statistics with :func:`rfa_feature_stats` and
    updates the running ones as nn.BatchNorm2d does. Under autocast, and for bf16/fp16
    tensors, the op computes in float32 (statistics and softmax need it; the GEMM is a small
    part of the cost) and answers in the autocast dtype, like the convolutions it replaces.
    """
    out_dtype = x.dtype
    if torch.is_autocast_enabled(x.device.type):
        out_dtype = torch.get_autocast_dtype(x.device.type)
    with torch.autocast(x.device.type, enabled=False):
        out = _rfa_layer_forward(layer, x)
    return out if out.dtype == out_dtype else out.to(out_dtype)


def _rfa_layer_forward(layer, x: Tensor) -> Tensor:
    ops = layer_operands(layer, x)
    a = ops.pop("cast")(layer.attn_logit_scale).t()
    return rfa_fused(ops["x"], ops["wdt"], ops["gamma"], ops["beta"], ops["mean"],
                     ops["inv_std"], a, ops["wt"], ops["bias"], ops["kernel_size"],
                     ops["stride"], ops["batch_stats"], ops["eps"])


def layer_operands(layer, x: Tensor) -> dict:
    """The operands the fused ops share, from an RFA-family layer and its input: x in the
    compute dtype (float32 for bf16/fp16), the depthwise weight, BN affine and statistics and
    the final conv in tap-major order (differentiable: gradients reach the layer's
    parameters), and ``cast`` (a tensor to the compute dtype). Takes the BN batch statistics
    with :func:`rfa_feature_stats` and updates the running ones as nn.BatchNorm2d does."""
    bn = layer.feature_bn
    c, k2, k, s = layer.in_channels, layer.taps, layer.kernel_size[0], layer.stride[0]
    dtype = torch.promote_types(x.dtype, layer.weight.dtype)
    if dtype in (torch.bfloat16, torch.float16):
        dtype = torch.float32

    def cast(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.to(dtype)

    x = x.to(dtype)
    wdt = cast(layer.feature_conv.weight).view(c, k2, k2).permute(2, 1, 0)
    gamma = _tap_major(cast(bn.weight), c, k2) if bn.affine else x.new_ones(k2, c)
    beta = _tap_major(cast(bn.bias), c, k2) if bn.affine else x.new_zeros(k2, c)
    wt = cast(layer.weight).view(layer.out_channels, c, k2).transpose(1, 2).reshape(
        layer.out_channels, k2 * c)
    batch_stats = layer.training or bn.running_mean is None
    if batch_stats:
        count = x.shape[0] * _out_size(x.shape[2], k, s) * _out_size(x.shape[3], k, s)
        if count < 2 and layer.training:
            from attnconv.layers.helpers import layer_name

            raise ValueError(f"{layer_name(layer)}: expected more than 1 value per channel "
                             f"when training (BatchNorm), got input {tuple(x.shape)}")
        with torch.no_grad():
            mean, var = rfa_feature_stats(x.detach(), wdt.detach().contiguous(), k, s)
        _update_running_stats(layer, mean.t().reshape(-1), var.t().reshape(-1), count)
    else:
        mean = _tap_major(bn.running_mean.to(dtype), c, k2)
        var = _tap_major(bn.running_var.to(dtype), c, k2)
    return {"x": x, "wdt": wdt, "gamma": gamma, "beta": beta, "mean": mean,
            "inv_std": torch.rsqrt(var + bn.eps), "wt": wt, "bias": cast(layer.bias),
            "kernel_size": k, "stride": s, "batch_stats": batch_stats, "eps": bn.eps,
            "cast": cast}


@torch.no_grad()
def _update_running_stats(layer, mean: Tensor, var: Tensor, count: int) -> None:
    """nn.BatchNorm2d's running-statistics update (unbiased variance), in the buffers' dtype."""
    bn = layer.feature_bn
    if not (layer.training and bn.track_running_stats):
        return
    bn.num_batches_tracked.add_(1)
    momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), momentum)
    bn.running_var.lerp_((var * (count / (count - 1))).to(bn.running_var.dtype), momentum)


# --- choosing the implementation -------------------------------------------------------------

#: "auto": the fused kernel where it runs (CPU, built), else eager; "eager": the layers' own
#: formulation; "fused": as "auto" (it falls back with a warning where the kernel cannot run).
#: On CPU "auto" means fused: 2x-4x faster than eager (benchmarks/RESULTS.md); on
#: GPUs eager, which torch.compile can fuse.
RFA_IMPLS = ("auto", "eager", "fused")
_default_impl = "auto"
_forced_eager = False
_warned: set[str] = set()


def _check_impl(impl: str | None, where: str = "impl") -> None:
    if impl is not None and impl not in RFA_IMPLS:
        raise ValueError(f"{where} must be one of {RFA_IMPLS} or None (the global default), "
                         f"got {impl!r}")


def set_rfa_impl(impl: str) -> None:
    """The implementation of RFAConv2d, RFCBAMConv2d and RFCAConv2d layers built with
    ``impl=None`` (default "auto")."""
    global _default_impl
    _check_impl(impl, "set_rfa_impl(impl)")
    _default_impl = impl or "auto"


def get_rfa_impl() -> str:
    return _default_impl


@contextlib.contextmanager
def eager_rfa() -> Iterator[None]:
    """Every RFA-family layer runs its eager formulation inside, whatever its ``impl``: for
    torch's FlopCounterMode, which counts the convs of the eager formulation but cannot see
    inside the fused op (the two compute the same thing)."""
    global _forced_eager
    previous, _forced_eager = _forced_eager, True
    try:
        yield
    finally:
        _forced_eager = previous


def use_fused(layer: str, impl: str | None, x: Tensor) -> bool:
    """Whether ``layer`` runs the fused op on ``x``; warns once per reason when it cannot."""
    impl = impl or _default_impl
    if (impl == "eager" or _forced_eager or torch.compiler.is_exporting()
            or torch.onnx.is_in_onnx_export()):
        return False  # export keeps the decomposed formulation (ONNX has no such operator)
    if x.device.type != "cpu":
        reason = f"the fused kernel covers CPU tensors only, got a {x.device.type} tensor"
    elif torch.compiler.is_compiling():
        # no building while tracing: use the kernel if an eager call already loaded it
        return not isinstance(_build_cache().get("rfa_fused", ""), str)
    else:
        reason = fused_available()
    if reason is None:
        return True
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"{layer}: running the eager path, not the fused kernel: {reason}",
                      RuntimeWarning, stacklevel=3)
    return False


def _build_cache() -> dict:
    from attnconv.ops import _build

    return _build._cache
