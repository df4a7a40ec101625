"""The complexity table: parameters, multiply-adds, speed and memory of whole networks.

What ``attnconv bench`` prints. Multiply-adds are counted by ``torch.utils.flop_counter``
(:func:`attnconv.analysis.profiling.count_macs`), which sees per-sample (batch-folded grouped)
convs and functional convs; the "GFLOPs" of the AW and RFAConv papers (thop) are multiply-adds too.
Times are medians with the models interleaved in one process, so the ratio columns stay
meaningful on a shared machine.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from attnconv.analysis.profiling import (
    count_macs,
    count_params,
    forward_fn,
    machine_description,
    median_times,
    saved_tensor_bytes,
)
from attnconv.engine.tables import markdown_table
from attnconv.models import MODEL_ARGS, check_model_name, create_model

FORMATS: tuple[str, ...] = ("markdown", "csv")


@dataclass
class ModelStats:
    """One row of the complexity table."""

    name: str
    params: int
    macs: int  # per image
    images_per_second: float  # eval-mode forward
    train_step_seconds: float  # forward, cross-entropy, backward, SGD step for one batch
    memory_bytes: int  # CPU: saved for backward; CUDA: peak allocated in a training step


def build(name: str, **kwargs: Any) -> nn.Module:
    """A zoo or baseline network from :func:`attnconv.create_model`, else from timm
    (ModelNameError with close names when neither has ``name``)."""
    if name in MODEL_ARGS:
        return create_model(name, **kwargs)
    check_model_name(name, extra=timm.list_models())
    return timm.create_model(name, **kwargs)


def check_device(device: torch.device | str) -> torch.device:
    """``device`` as a torch.device; ValueError when it is not cpu or cuda, or names a GPU this
    machine does not have."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be cpu, cuda or cuda:N, not {device!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu, cuda or cuda:N, not {str(device)!r}")
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise ValueError(f"device {device}: torch sees no CUDA GPU here; use cpu")
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {device}: torch sees {count} CUDA GPU(s), "
                             f"cuda:0 to cuda:{count - 1}")
    return device


def check_bench_args(input_size: Sequence[int], batch_size: int, repeats: int,
                     num_classes: int) -> None:
    """ValueError naming the argument of :func:`benchmark_models` that cannot be measured."""
    if len(input_size) != 3 or any(n < 1 for n in input_size):
        raise ValueError(f"input_size must be 3 numbers >= 1 (channels, height, width), not "
                         f"{' '.join(map(str, input_size))}")
    for name, value in (("batch_size", batch_size), ("repeats", repeats),
                        ("num_classes", num_classes)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, not {value}")


def memory_label(device: torch.device | str) -> str:
    if torch.device(device).type == "cuda":
        return "peak memory (MB)"
    return "saved for backward (MB)"


def _train_step(model: nn.Module, x: torch.Tensor, target: torch.Tensor,
                optimizer: torch.optim.Optimizer) -> Callable[[], None]:
    def run() -> None:
        model.train()
        F.cross_entropy(model(x), target).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return run


def _cuda_peak_bytes(step: Callable[[], None]) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def benchmark_models(
    names: Sequence[str],
    input_size: Sequence[int] = (3, 224, 224),
    batch_size: int = 8,
    *,
    device: torch.device | str = "cpu",
    repeats: int = 5,
    warmup: int = 1,
    num_classes: int = 1000,
    progress: bool = True,
    **model_kwargs: Any,
) -> list[ModelStats]:
    """Measure every network of ``names`` (built with ``num_classes`` and ``model_kwargs``).

    Memory is what the device can report: on CUDA the peak allocated during a training step
    (parameters, gradients and optimizer state included); on CPU, which has no allocator
    statistics, the bytes autograd saves for backward in one training forward -- the
    activation memory, the part that grows with batch and resolution. Arguments that cannot
    be measured raise ValueError before any model is built.
    """
    check_bench_args(input_size, batch_size, repeats, num_classes)
    device = check_device(device)
    all_timm: list[str] = []
    for name in names:  # every name is checked before the first is measured
        if name not in MODEL_ARGS:
            all_timm = all_timm or timm.list_models()
            check_model_name(name, extra=all_timm)
    from tqdm.auto import tqdm

    steps = 3 * len(names) + 2 * (warmup + repeats) * len(names)
    bar = tqdm(total=steps, desc="bench", unit="step", disable=not progress, leave=False)
    x = torch.randn(batch_size, *input_size, device=device)
    target = torch.randint(0, num_classes, (batch_size,), device=device)
    models: dict[str, nn.Module] = {}
    rows: dict[str, dict[str, Any]] = {}
    forwards, train_steps = {}, {}
    for name in names:
        bar.set_postfix_str(f"{name}: build")
        model = build(name, num_classes=num_classes, **model_kwargs).to(device)
        models[name] = model
        bar.update()
        bar.set_postfix_str(f"{name}: count")
        rows[name] = dict(params=count_params(model),
                          macs=count_macs(model.eval(), x[:1]))
        bar.update()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        train_steps[name] = _train_step(model, x, target, optimizer)
        forwards[name] = forward_fn(model, x)
        bar.set_postfix_str(f"{name}: memory")
        if device.type == "cuda":
            train_steps[name]()  # optimizer state exists from the first step on
            rows[name]["memory_bytes"] = _cuda_peak_bytes(train_steps[name])
        else:
            rows[name]["memory_bytes"] = saved_tensor_bytes(model, x)
        bar.update()

    def ticking(fns: dict[str, Callable[[], object]], phase: str
                ) -> dict[str, Callable[[], None]]:
        def wrap(name: str, fn: Callable[[], object]) -> Callable[[], None]:
            def run() -> None:
                bar.set_postfix_str(f"{name}: {phase}")
                fn()
                bar.update()
            return run
        return {name: wrap(name, fn) for name, fn in fns.items()}

    forward_s = median_times(ticking(forwards, "inference"), repeats=repeats, warmup=warmup)
    train_s = median_times(ticking(train_steps, "training"), repeats=repeats, warmup=warmup)
    bar.close()
    return [ModelStats(name, images_per_second=batch_size / forward_s[name],
                       train_step_seconds=train_s[name], **rows[name]) for name in names]


def table_rows(stats: Sequence[ModelStats]) -> tuple[list[str], list[list[object]]]:
    """Headers and rows, each figure followed by its ratio to the first model."""
    base = stats[0]
    headers = ["model", "params (M)", "x", "MACs (G)", "x", "inference (img/s)", "x",
               "train step (ms)", "x", "memory (MB)", "x"]
    rows = []
    for s in stats:
        rows.append([
            s.name,
            s.params / 1e6, s.params / base.params,
            s.macs / 1e9, s.macs / base.macs,
            s.images_per_second, s.images_per_second / base.images_per_second,
            s.train_step_seconds * 1e3, s.train_step_seconds / base.train_step_seconds,
            s.memory_bytes / 2**20, s.memory_bytes / base.memory_bytes,
        ])
    return headers, rows


def complexity_table(stats: Sequence[ModelStats], fmt: str = "markdown",
                     memory: str = "memory (MB)") -> str:
    """The table as GitHub markdown or CSV; ``memory`` names the memory column."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    headers, rows = table_rows(stats)
    headers[headers.index("memory (MB)")] = memory
    if fmt == "markdown":
        rows = [[f"{v:.2f}" if isinstance(v, float) and i in (1, 3) else v
                 for i, v in enumerate(row)] for row in rows]
        return markdown_table(headers, rows)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(headers)
    writer.writerows([[f"{v:.6g}" if isinstance(v, float) else v for v in row] for row in rows])
    return out.getvalue().rstrip("\n")


def describe(input_size: Sequence[int], batch_size: int, device: torch.device | str,
             repeats: int) -> str:
    """The header printed above the table."""
    return (
        f"Input ({batch_size}, {', '.join(map(str, input_size))}) on {device} "
        f"({machine_description(device)}), median of {repeats} runs, models interleaved.\n"
        "MACs (G): multiply-adds of one image, torch.utils.flop_counter (the papers' \"GFLOPs\", "
        "as counted by thop, are multiply-adds). Train step: forward, cross-entropy, backward "
        "and SGD step of one batch. "
        + ("Memory: peak allocated during a training step." if torch.device(device).type == "cuda"
           else "Memory: tensors autograd saves for backward in one training forward.")
        + " x: ratio to the first model."
    )
