"""Helpers shared by the test modules (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

import torch
import torchvision
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
    for key, (tensor, _) in layer.official_keys().items():
        torch.testing.assert_close(tensor.reshape(ref_state[key].shape), ref_state[key],
                                   msg=key, **tol)
        if key in ref_params:
            torch.testing.assert_close(tensor.grad.reshape(ref_params[key].shape),
                                       ref_params[key].grad, msg=key, **tol)


def official_rfa_resnet18_state_dict() -> dict[str, torch.Tensor]:
    """Keys and shapes of the official ``classification/RFAresnet.py`` RFAresnet18: torchvision
    names, and in every BasicBlock an ``RFAConv`` as conv1 (``get_weight.1``,
    ``generate_feature.0/1``, ``conv.0``), filled with random values."""
    torch.manual_seed(0)
    state = {k: torch.randn(v.shape) if v.is_floating_point() else v
             for k, v in torchvision.models.resnet18().state_dict().items()}
    for stage, (c_in, c_out, blocks) in enumerate(((64, 64, 2), (64, 128, 2), (128, 256, 2),
                                                  (256, 512, 2)), start=1):
        for block in range(blocks):
            c = c_in if block == 0 else c_out
            p = f"layer{stage}.{block}.conv1"
            del state[f"{p}.weight"]
            state.update({
                f"{p}.get_weight.1.weight": torch.randn(c * 9, 1, 1, 1),
                f"{p}.generate_feature.0.weight": torch.randn(c * 9, 1, 3, 3),
                f"{p}.generate_feature.1.weight": torch.rand(c * 9) + 0.5,
                f"{p}.generate_feature.1.bias": torch.randn(c * 9),
                f"{p}.generate_feature.1.running_mean": torch.randn(c * 9),
                f"{p}.generate_feature.1.running_var": torch.rand(c * 9) + 0.5,
                f"{p}.generate_feature.1.num_batches_tracked": torch.tensor(7),
                f"{p}.conv.0.weight": torch.randn(c_out, c, 3, 3),
                f"{p}.conv.0.bias": torch.randn(c_out),
            })
    return state
