"""The fused RFAConv operator ``torch.ops.attnconv.rfa_fused`` and its eager formulation.

Zhang et al., "RFAConv", arXiv:2304.03198. With tap-major features (index t * C + c):

    z = depthwise_k,s(x)                          (N, k2 * C, H', W'), never stored
    out = conv_1x1(relu(BN(z)) * softmax_t(a * avgpool_k,s(x)), wt) + bias

The operators take tensors only (the layers in :mod:`attnconv.layers.rfa_conv` build them from
their parameters). Their schemas and CPU kernels are C++ (``csrc/rfa_fused.cpp``,
``TORCH_LIBRARY``), which computes tile by tile of output positions on every core; training
keeps only ``x`` for backward and recomputes the features per tile. The fake (meta) kernels and
the autograd formulas are registered here once the library is loaded, so ``torch.compile``
treats each op as one opaque call. :func:`rfa_eager` is the same function in plain
differentiable ops: the path on devices the kernel does not cover, and the second derivative
(the C++ backward itself is not differentiable, so a backward with ``create_graph=True``
recomputes through :func:`rfa_eager`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from attnconv.ops._build import is_loaded, load_extension

__all__ = [
    "RFA_IMPLS", "ensure_loaded", "fused_available", "rfa_eager", "rfa_feature_stats",
    "rfa_fused", "use_fused",
]


STEM = "rfa_fused"
_registered = False
#: registrations (fake kernels, autograd) of the library's other operators, run once it loads
_after_load: list[Callable[[], None]] = []


def on_load(register: Callable[[], None]) -> Callable[[], None]:
    """Run ``register`` once the C++ library is loaded (now, if it is); a decorator."""
    _after_load.append(register)
    if _registered:
        register()
    return register


def _ops():
    return torch.ops.attnconv


def ensure_loaded() -> str | None:
    """Load the C++ operators (building them first where ``make`` did not) and register their
    fake kernels and autograd formulas: None once they are there, else the one-line reason
    they are not."""
    global _registered
    reason = load_extension(STEM)
    if reason is None and not _registered:
        _register_python_parts()
        for register in _after_load:
            register()
        _registered = True
    return reason


def fused_available() -> str | None:
    """None when the C++ kernels are built and loaded, else the reason they are not."""
    return ensure_loaded()


# --- the operators (schemas and CPU kernels in csrc/rfa_fused.cpp) ---------------------------

def rfa_feature_stats(x: Tensor, wdt: Tensor, kernel_size: int, stride: int) -> tuple[Tensor,
                                                                                       Tensor]:
    """Batch mean and biased variance (k2, C) of the depthwise features (no gradient)."""
    return _ops().rfa_feature_stats(x, wdt, kernel_size, stride)


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
    return _ops().rfa_fused(x, wdt, gamma, beta, mean, inv_std, a, wt, bias, kernel_size,
                            stride, batch_stats, eps)


def rfa_fused_backward(grad_out: Tensor, x: Tensor, wdt: Tensor, gamma: Tensor, beta: Tensor,
                       mean: Tensor, inv_std: Tensor, a: Tensor, wt: Tensor, has_bias: bool,
                       kernel_size: int, stride: int, batch_stats: bool) -> list[Tensor]:
    """Gradients of :func:`rfa_fused` w.r.t. x, wdt, gamma, beta, a, wt, bias (the last
    empty without bias)."""
    return _ops().rfa_fused_backward(grad_out, x, wdt, gamma, beta, mean, inv_std, a, wt,
                                     has_bias, kernel_size, stride, batch_stats)


def _out_size(size: int, k: int, s: int) -> int:
    return (size + 2 * (k // 2) - k) // s + 1


def _stats_fake(x, wdt, kernel_size, stride):
    k2, _, c = wdt.shape
    return x.new_empty(k2, c), x.new_empty(k2, c)


def _fused_fake(x, wdt, gamma, beta, mean, inv_std, a, wt, bias, kernel_size, stride,
                batch_stats, eps):
    n, _, h, w = x.shape
    size = (n, wt.shape[0], _out_size(h, kernel_size, stride), _out_size(w, kernel_size, stride))
    return x.new_empty(size).contiguous(memory_format=torch.channels_last)


def _fused_backward_fake(grad_out, x, wdt, gamma, beta, mean, inv_std, a, wt, has_bias,
                         kernel_size, stride, batch_stats):
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


def _register_python_parts() -> None:
    torch.library.register_fake("attnconv::rfa_feature_stats", _stats_fake)
    torch.library.register_fake("attnconv::rfa_fused", _fused_fake)
    torch.library.register_fake("attnconv::rfa_fused_backward", _fused_backward_fake)
    torch.library.register_autograd("attnconv::rfa_fused", _backward,
                                    setup_context=_setup_context)


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


# --- choosing the implementation -------------------------------------------------------------

#: "auto": on CPU the path each layer measured faster for its mode (its ``auto_fused``), on
#: other devices eager (which torch.compile can fuse); "eager": the layers' own formulation;
#: "fused": the fused kernel (falling back with a warning where it cannot run).
RFA_IMPLS = ("auto", "eager", "fused")
_warned: set[str] = set()


def use_fused(layer: str, impl: str, x: Tensor, auto_fused: bool = True) -> bool:
    """Whether ``layer`` runs the fused op on ``x``. ``auto_fused``: whether "auto" picks the
    fused kernel for this layer and mode on CPU (the layer's measured choice). On other
    devices "auto" is the eager path, silently (torch.compile fuses it there); an explicit
    "fused" that cannot run warns once per reason."""
    if (impl == "eager" or torch.compiler.is_exporting()
            or torch.onnx.is_in_onnx_export()):
        return False  # export keeps the decomposed formulation (ONNX has no such operator)
    if impl == "auto" and (x.device.type != "cpu" or not auto_fused):
        return False
    if x.device.type != "cpu":
        reason = f"the fused kernel covers CPU tensors only, got a {x.device.type} tensor"
    elif torch.compiler.is_compiling():
        # no building while tracing: use the kernel if an eager call already loaded it
        return is_loaded(STEM) and _registered
    else:
        reason = fused_available()
    if reason is None:
        return True
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"{layer}: running the eager path, not the fused kernel: {reason}",
                      RuntimeWarning, stacklevel=3)
    return False

