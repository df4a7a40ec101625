"""Measuring layers and models: multiply-adds, wall time and memory kept for backward.

Used by ``benchmarks/``, ``attnconv demo``, ``attnconv bench`` and the tables the tasks print
before training; timings are never asserted in tests. Times are medians over repeats, with the
candidates interleaved in one process so that a noisy machine slows all of them alike and their
ratios stay meaningful.
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

from attnconv.engine.tables import markdown_table
from attnconv.layers.base import use_impl


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_macs(module: nn.Module, *inputs: torch.Tensor) -> int:
    """Multiply-adds of one forward pass (what the papers call FLOPs, as thop counts them).

    torch's FlopCounterMode counts 2 FLOPs per multiply-add of convolutions and matmuls,
    including per-sample (grouped) and functional convs; elementwise ops are not counted.
    """
    # The fused RFA ops are one node each to the counter: count the eager formulation they equal.
    with torch.no_grad(), use_impl(module, "eager"), FlopCounterMode(display=False) as counter:
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


def attention_layers(model: nn.Module) -> list[tuple[str, int, str]]:
    """``(kind, count, where)`` for each kind of attention conv (AW, RFA, ...) and activation
    attention (SE, CBAM, ...) in ``model``, in the order they first appear.

    ``where`` names the module slots, e.g. ``conv1 in layer1-4``; an attention inside another
    (the CAM of a CAMConv) belongs to the outer one.
    """
    from attnconv.layers import ATTN_LAYERS, AttnConv2d
    from attnconv.layers.base import is_attention_conv

    gates = tuple(cls for cls in ATTN_LAYERS.values() if isinstance(cls, type))
    found: dict[str, list[str]] = {}
    outer: list[str] = []
    for name, module in model.named_modules():
        if not (is_attention_conv(module) or isinstance(module, gates)) \
                or any(name.startswith(o + ".") for o in outer):
            continue
        outer.append(name)
        kind = type(module).__name__
        if isinstance(module, AttnConv2d):
            kind = f"{kind}({module.attn_name})"
        found.setdefault(kind, []).append(name)
    return [(kind, len(names), _where(names)) for kind, names in found.items()]


def _where(names: Sequence[str]) -> str:
    # "layer2.1.conv1" -> slot "conv1" (after the last block index) in stage "layer2".
    slots: dict[str, None] = {}
    stages: dict[str, None] = {}
    for name in names:
        parts = name.split(".")
        index = max((i for i, p in enumerate(parts) if p.isdigit()), default=len(parts) - 1)
        slots[".".join(parts[index + 1:]) or parts[-1]] = None
        stages[".".join(parts[:index]) or "(top)"] = None
    return f"{', '.join(slots)} in {_span(list(stages))}"


def _span(stages: list[str]) -> str:
    """``layer1, layer2, layer3`` -> ``layer1-3`` (consecutive numbered stages only)."""
    stems = {s.rstrip("0123456789") for s in stages}
    numbers = [s[len(s.rstrip("0123456789")):] for s in stages]
    if len(stages) > 1 and len(stems) == 1 and all(numbers):
        values = [int(n) for n in numbers]
        if values == list(range(values[0], values[0] + len(values))):
            return f"{stages[0]}-{values[-1]}"
    return ", ".join(stages)


def model_table(rows: Iterable[tuple[str, nn.Module]], *inputs: torch.Tensor,
                  input_label: str) -> str:
    """What a run trains, before it trains: model, parameters, multiply-adds of one forward
    of ``inputs`` (:func:`count_macs`, in eval mode) and the attention layers
    (:func:`attention_layers`), one row per ``(name, model)``."""
    lines = []
    for name, model in rows:
        was_training = model.training
        macs = count_macs(model.eval(), *inputs)
        model.train(was_training)
        attention = "; ".join(f"{kind} x{count}: {where}"
                              for kind, count, where in attention_layers(model))
        lines.append((name, count_params(model) / 1e6, macs / 1e6, attention or "none"))
    return markdown_table(("model", "params (M)", f"MACs (M) per {input_label}",
                           "attention (layer x count: where)"), lines)
