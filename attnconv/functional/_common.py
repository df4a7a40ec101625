"""Pieces every functional file needs: the autocast compute dtype and the differentiable
(create_graph=True) backward of the custom autograd Functions."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

LOW_PRECISION = (torch.float16, torch.bfloat16)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the convs run in: autocast's for ``x``'s device type when it is on (CPU and
    CUDA alike), else ``x``'s own dtype."""
    device = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``t`` in ``dtype`` (None stays None); a no-op when it already is."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sums over the batch (parameter gradients, statistics) run in float32 for fp16/bf16."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


def is_exporting() -> bool:
    """Whether the call is being traced by ``torch.export`` or the ONNX exporter."""
    return torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting()


def recompute_backward(needs: Sequence[bool], plain: Callable[..., torch.Tensor],
                       inputs: Sequence[torch.Tensor | None], grad_out: torch.Tensor,
                       wrt: Sequence[torch.Tensor | None] | None = None
                       ) -> tuple[torch.Tensor | None, ...]:
    """The backward of a custom Function when autograd records it (``create_graph=True``).

    The fast backward passes are written for one derivative. When a second is asked for
    (gradient penalties, WGAN-GP, sharpness-aware training), the plain formulation ``plain`` is
    run again on the saved inputs and differentiated by autograd with ``create_graph=True``, so
    the second-order gradients are those of the plain formulation, exactly.

    ``wrt`` (default ``inputs``) are the tensors differentiated, one per entry of ``needs``;
    ``plain`` may build some of them itself and return them: it then returns
    ``(output, wrt)``.
    """
    with torch.enable_grad():
        # Aliases, so that the gradient w.r.t. each input counts only the paths through it
        # here (x reaches AW's hidden too; the engine adds that path itself).
        inputs = [None if t is None else t.view_as(t) for t in inputs]
        result = plain(*inputs)
    output, wrt = result if isinstance(result, tuple) else (result, inputs if wrt is None
                                                             else wrt)
    wanted = [t for t, need in zip(wrt, needs, strict=True) if need]
    grads = iter(torch.autograd.grad(output, wanted, grad_out, create_graph=True,
                                     materialize_grads=True))
    return tuple(next(grads) if need else None for need in needs)
