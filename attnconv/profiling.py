"""Measuring layers and models: multiply-adds, wall time and memory kept for backward.

Used by ``benchmarks/``, ``attnconv demo`` and ``attnconv bench``; timings are never asserted
in tests. Times are medians over repeats, with the candidates interleaved in one process so
that a noisy machine slows all of them alike and their ratios stay meaningful.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_macs(module: nn.Module, *inputs: torch.Tensor) -> int:
    """Multiply-adds of one forward pass (what the papers call FLOPs, as thop counts them).

    torch's FlopCounterMode counts 2 FLOPs per multiply-add of convolutions and matmuls,
    including per-sample (grouped) and functional convs; elementwise ops are not counted.
    """
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*inputs)
    return counter.get_total_flops() // 2


def median_times(fns: dict[str, Callable[[], object]], *, repeats: int = 10,
                 warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved round-robin."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            _synchronize()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in samples.items()}


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def machine_description(device: torch.device | str = "cpu") -> str:
    """CPU model and thread count, or GPU name, for the header of a results table."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        model = next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")),
                     model)
    return f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def forward_fn(module: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    """One eval-mode forward pass without autograd."""
    def run() -> object:
        module.eval()
        with torch.no_grad():
            return module(x)
    return run


def train_step_fn(module: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    """One train-mode forward + backward, with the input's gradient as inside a network."""
    x = x.detach().requires_grad_(True)

    def run() -> object:
        module.train()
        module(x).sum().backward()
        module.zero_grad(set_to_none=True)
        x.grad = None
        return None
    return run


def saved_tensor_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps for backward of one train-mode forward (distinct storages).

    Parameters are left out: they exist whether or not a backward pass follows.
    """
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    module.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x.detach().requires_grad_(True))
    return sum(seen.values())


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub-markdown table; floats get three significant digits (whole numbers above 100)."""
    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"
        return str(v)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
