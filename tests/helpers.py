"""Helpers shared by the test modules (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

import torch
from torch import nn


def randomise(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random parameters and BN statistics, so no part of the computation is trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return module


def run(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Output and input gradient of ``module`` under a fixed, position-dependent upstream
    gradient."""
    x = x.detach().clone().requires_grad_(True)
    out = module(x)
    out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape))
    return out.detach(), x.grad


def assert_matches_official(ref: nn.Module, layer: nn.Module, x: torch.Tensor, **tol) -> None:
    """``layer`` equals the official module ``ref`` holding the same parameters: output, input
    gradient, every official tensor (running statistics included) and its gradient."""
    out_ref, grad_ref = run(ref, x)
    out, grad = run(layer, x)
    torch.testing.assert_close(out, out_ref, **tol)
    torch.testing.assert_close(grad, grad_ref, **tol)
    ref_params, ref_state = dict(ref.named_parameters()), ref.state_dict()
    for key, (tensor, _) in layer._official_keys().items():
        torch.testing.assert_close(tensor.reshape(ref_state[key].shape), ref_state[key],
                                   msg=key, **tol)
        if key in ref_params:
            torch.testing.assert_close(tensor.grad.reshape(ref_params[key].shape),
                                       ref_params[key].grad, msg=key, **tol)
