"""The fused RFAConv operator ``torch.ops.attnconv.rfa_fused``.

Zhang et al., "RFAConv", arXiv:2304.03198:

    z = depthwise_k,s(x)                          (N, C * k2, H', W'), never stored
    out = conv_1x1(relu(BN(z)) * softmax_t(a * avgpool_k,s(x)), weight) + bias

The operators take the layers' tensors as the modules hold them (the depthwise and final conv
weights, the BatchNorm's affine and statistics, the logit scales) and nothing else; the
functions of :mod:`attnconv.functional.rfa` call them. Their schemas and CPU kernels are C++
(``csrc/rfa_fused.cpp``, ``TORCH_LIBRARY``), which computes tile by tile of output positions on
every core; training keeps only ``x`` for backward and recomputes the features per tile. The
fake (meta) kernels are registered here once the library is loaded (:func:`on_load` runs the
other registrations then), so ``torch.compile`` treats each op as one opaque call; the autograd
formulas are registered by :mod:`attnconv.functional.rfa`, which holds the eager formulation
that a second derivative differentiates (the C++ backward is not itself differentiable).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from attnconv.ops._build import is_loaded, load_extension

__all__ = ["RFA_IMPLS", "ensure_loaded", "fused_available", "rfa_feature_stats", "rfa_fused",
           "use_fused"]


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

def rfa_feature_stats(x: Tensor, weight_dw: Tensor, stride: int) -> tuple[Tensor, Tensor]:
    """Batch mean and biased variance (C * k2) of the depthwise features (no gradient)."""
    return _ops().rfa_feature_stats(x, weight_dw, stride)


def rfa_fused(x: Tensor, weight_dw: Tensor, gamma: Tensor, beta: Tensor, mean: Tensor,
              var: Tensor, logit_scale: Tensor, weight: Tensor, bias: Tensor | None,
              stride: int, batch_stats: bool, eps: float) -> Tensor:
    """The fused RFAConv on the layer's tensors as it holds them:

    x (N, C, H, W); weight_dw (C * k2, 1, k, k) the depthwise conv; gamma, beta, mean, var
    (C * k2) its BatchNorm (the batch's statistics when ``batch_stats``: their gradient is then
    part of the op's); logit_scale (C, k2); weight (O, C, k, k) and bias the final conv.
    Returns (N, O, H', W') in channels-last memory format.
    """
    return _ops().rfa_fused(x, weight_dw, gamma, beta, mean, var, logit_scale, weight, bias,
                            stride, batch_stats, eps)


def rfa_fused_backward(grad_out: Tensor, x: Tensor, weight_dw: Tensor, gamma: Tensor,
                       beta: Tensor, mean: Tensor, var: Tensor, logit_scale: Tensor,
                       weight: Tensor, has_bias: bool, stride: int, batch_stats: bool,
                       eps: float) -> list[Tensor]:
    """Gradients of :func:`rfa_fused` w.r.t. x, weight_dw, gamma, beta, logit_scale, weight,
    bias (the last empty without bias)."""
    return _ops().rfa_fused_backward(grad_out, x, weight_dw, gamma, beta, mean, var,
                                     logit_scale, weight, has_bias, stride, batch_stats, eps)


def _out_size(size: int, k: int, s: int) -> int:
    return (size + 2 * (k // 2) - k) // s + 1


def _stats_fake(x, weight_dw, stride):
    return x.new_empty(weight_dw.shape[0]), x.new_empty(weight_dw.shape[0])


def _fused_fake(x, weight_dw, gamma, beta, mean, var, logit_scale, weight, bias, stride,
                batch_stats, eps):
    n, _, h, w = x.shape
    k = weight_dw.shape[-1]
    size = (n, weight.shape[0], _out_size(h, k, stride), _out_size(w, k, stride))
    return x.new_empty(size).contiguous(memory_format=torch.channels_last)


def _fused_backward_fake(grad_out, x, weight_dw, gamma, beta, mean, var, logit_scale, weight,
                         has_bias, stride, batch_stats, eps):
    # contiguous like the kernel's results, whatever the strides of the inputs
    return [x.new_empty(x.shape).contiguous(memory_format=torch.channels_last),
            x.new_empty(weight_dw.shape), x.new_empty(gamma.shape), x.new_empty(beta.shape),
            x.new_empty(logit_scale.shape), x.new_empty(weight.shape),
            x.new_empty(weight.shape[0] if has_bias else 0)]


def _register_python_parts() -> None:
    torch.library.register_fake("attnconv::rfa_feature_stats", _stats_fake)
    torch.library.register_fake("attnconv::rfa_fused", _fused_fake)
    torch.library.register_fake("attnconv::rfa_fused_backward", _fused_backward_fake)


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

