"""Every attention conv of the registry on a GPU: results against float64 on the CPU, then time.

    python benchmarks/gpu_check.py [--out gpu_check.md] [--layers aw rfa ...] [--no-compile]
                                   [--no-timing] [--budget 360] [--allow-load]
    python benchmarks/gpu_check.py --device cpu     # tiny shapes: keeps the script from rotting

Checks, for each layer of ``attnconv.layers.CONV_LAYERS`` but the plain conv, at stride 1 and 2
(random parameters, std 0.3, so every attention does real work; train mode, a fixed upstream
gradient): the output, the input gradient and the weight gradient, and the eval-mode output,
against the same module in float64 on the CPU. The error is the largest |difference| over the
largest |float64 value|; :data:`TOLERANCES` gives the limit per mode:

- fp32: float32 on the device, TF32 off (it trades precision on purpose);
- bf16: under ``torch.autocast(dtype=torch.bfloat16)``; input gradients get 4x the output's
  limit, as the mode contract in tests/test_modes.py allows;
- compile: ``torch.compile`` (inductor), train step only (one compile per layer);
- channels-last: module and input in ``torch.channels_last``.

Then times, per layer: the eval forward and the training step of the layer eager and compiled,
against conv + BN + ReLU of the same shape and, for the RFA family, the official module
(``attnconv.testing.reference_rfa``), in interleaved rounds. Eager timings come first, then the
compiled ones shape by shape while ``--budget`` seconds have not passed (the rest are listed as
skipped), so one GPU run stays under 8 minutes. Warnings a layer raises are listed, not judged.
Exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import harness
import torch
from torch import nn

from attnconv.analysis.profiling import forward_fn, train_step_fn
from attnconv.layers import CONV_LAYERS, create_conv
from attnconv.testing.reference_rfa import OfficialRFAConv, OfficialRFCAConv, OfficialRFCBAMConv

MODES = ("fp32", "bf16", "compile", "channels-last")
QUANTITIES = ("out", "grad x", "grad W", "eval out")
#: Largest error / largest |float64 value| accepted, per mode and quantity.
TOLERANCES = {
    "fp32": dict.fromkeys(QUANTITIES, 1e-4),
    "bf16": {"out": 3e-2, "grad x": 1.2e-1, "grad W": 3e-2, "eval out": 3e-2},
    "compile": dict.fromkeys(QUANTITIES, 2e-4),
    "channels-last": dict.fromkeys(QUANTITIES, 1e-4),
}
OFFICIAL = {"rfa": OfficialRFAConv, "rfcbam": OfficialRFCBAMConv, "rfca": OfficialRFCAConv}
# (batch, channels, size): checks run at stride 1 and 2; timings at (batch, channels, size, stride)
CHECK_SHAPE = {"cuda": (4, 16, 16), "cpu": (2, 4, 8)}
TIME_SHAPES = {"cuda": [(8, 64, 56, 1), (32, 128, 28, 2)], "cpu": [(2, 8, 8, 1)]}
CBR = "conv + BN + ReLU"


def layer_names() -> list[str]:
    return [name for name in CONV_LAYERS if name != "conv"]


def make_layer(name: str, channels: int, stride: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layer = create_conv(name, channels, channels, 3, stride, padding=1)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return layer


def results(module: nn.Module, x: torch.Tensor, upstream: torch.Tensor, *,
            bf16: bool = False, eval_too: bool = True) -> dict[str, torch.Tensor]:
    """Output, input and weight gradients of a train step (``upstream`` the output's gradient,
    in its dtype), and the eval output, of ``module`` on ``x``; on the CPU in float64."""
    xi = x.detach().clone().requires_grad_(True)
    module.weight.grad = None
    module.train()
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        out = module(xi)
    upstream = upstream.to(x.device)
    (out.to(upstream.dtype) * upstream).sum().backward()
    found = {"out": out, "grad x": xi.grad, "grad W": module.weight.grad}
    if eval_too:
        module.eval()
        with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            found["eval out"] = module(x)
    return {k: v.detach().cpu().double() for k, v in found.items()}


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    if got.shape != ref.shape:
        return float("inf")
    scale = ref.abs().max().clamp_min(1e-30)
    return ((got - ref).abs().max() / scale).nan_to_num(float("inf")).item()


def check_layer(name: str, device: torch.device, stride: int, modes: list[str]) -> list[list]:
    """Rows ``[layer, stride, mode, quantity, error, tolerance, verdict, warnings]``."""
    batch, channels, size = CHECK_SHAPE[device.type]
    layer = make_layer(name, channels, stride)
    x = torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(1))
    exact = copy.deepcopy(layer).double()
    with torch.no_grad():  # in eval mode: a train-mode probe would move BN's running stats
        out_shape = exact.eval()(x.double()).shape
    upstream = torch.randn(out_shape, generator=torch.Generator().manual_seed(2))
    reference = results(exact, x.double(), upstream.double())
    rows = []
    for mode in modes:
        module = copy.deepcopy(layer).to(device)
        xd = x.to(device)
        if mode == "channels-last":
            module = module.to(memory_format=torch.channels_last)
            xd = xd.contiguous(memory_format=torch.channels_last)
        if mode == "compile":
            torch.compiler.reset()
            module = torch.compile(module)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                got = results(module, xd, upstream, bf16=mode == "bf16",
                              eval_too=mode != "compile")
                error = None
            except Exception as exc:  # a failing mode is a finding, not the end of the check
                got, error = {}, f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        said = "; ".join(sorted({str(w.message).splitlines()[0][:120] for w in caught})) or "-"
        if error:
            rows.append([name, stride, mode, "all", error, "-", "FAIL", said])
        for quantity, value in got.items():
            err = relative_error(value, reference[quantity])
            tol = TOLERANCES[mode][quantity]
            rows.append([name, stride, mode, quantity, f"{err:.1e}", f"{tol:.0e}",
                         "ok" if err <= tol else "FAIL", said])
    return rows


def timed_candidates(name: str, shape: tuple[int, int, int, int], device: torch.device,
                     compiled: bool) -> dict[str, nn.Module]:
    _, channels, _, stride = shape
    modules = {CBR: nn.Sequential(nn.Conv2d(channels, channels, 3, stride, 1),
                                  nn.BatchNorm2d(channels), nn.ReLU()),
               name: create_conv(name, channels, channels, 3, stride, padding=1)}
    if name in OFFICIAL:
        modules["official"] = OFFICIAL[name](channels, channels, 3, stride)
        modules[name].load_official_state_dict(modules["official"].state_dict())
    modules = {k: m.to(device) for k, m in modules.items()}
    if compiled:
        torch.compiler.reset()
        modules = {k: torch.compile(m) for k, m in modules.items()}
    return modules


def shape_label(shape: tuple[int, int, int, int]) -> str:
    batch, channels, size, stride = shape
    return f"({batch}, {channels}, {size}, {size}) s{stride}"


def time_layer(name: str, shape: tuple[int, int, int, int], device: torch.device,
               compiled: bool, args: argparse.Namespace) -> list:
    """``[layer, shape, mode, ms eval, ms train, eval / cbr, train / cbr, official / layer
    (eval, train)]``; an error becomes the row's message."""
    batch, channels, size, _ = shape
    label = shape_label(shape)
    mode = "compiled" if compiled else "eager"
    try:
        modules = timed_candidates(name, shape, device, compiled)
        x = torch.randn(batch, channels, size, size, device=device)
        timings = []
        for make in (forward_fn, train_step_fn):
            fns: dict[str, Callable[[], object]] = {k: make(m, x) for k, m in modules.items()}
            timings.append(harness.measure(fns, rounds=args.rounds, warmup=args.warmup))
    except Exception as exc:  # reported in the table; the other layers still run
        return [name, label, mode, f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}"]
    fwd, train = timings
    official = ([fwd.ratio("official", name), train.ratio("official", name)]
                if "official" in modules else ["-", "-"])
    return [name, label, mode, fwd.median(name) * 1e3, train.median(name) * 1e3,
            fwd.ratio(name, CBR), train.ratio(name, CBR), *official]


def main(argv: list[str] | None = None) -> int:
    parser = harness.parser(__doc__)
    parser.set_defaults(rounds=10)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (tiny shapes)")
    parser.add_argument("--layers", nargs="+", choices=layer_names(), default=layer_names())
    parser.add_argument("--no-compile", action="store_true", help="skip every torch.compile")
    parser.add_argument("--no-timing", action="store_true", help="the checks only")
    parser.add_argument("--budget", type=float, default=360.0,
                        help="seconds after which no further compiled timing starts")
    parser.add_argument("--out", type=Path, help="also write the tables to this markdown file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type not in CHECK_SHAPE:
        parser.error(f"--device must be cuda or cpu, got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here (use --device cpu for the tiny run)")
    begin = time.monotonic()
    run = harness.start(args, timed=not args.no_timing)
    if device.type == "cpu":
        torch.set_num_threads(args.threads[0])
    else:
        torch.zeros(1, device=device)  # initialise CUDA, so the header names the GPU
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    out = args.out.open("w") if args.out else None
    modes = [m for m in MODES if not (args.no_compile and m == "compile")]

    def table(title: str, headers: list[str], rows: list, timed: bool) -> None:
        rows = [[*row, *["-"] * (len(headers) - len(row))] for row in rows]
        text = run.table(title, headers, rows, timed=timed)
        if out:
            out.write(text + "\n")
            out.flush()

    checks = [row for name in args.layers for stride in (1, 2)
              for row in check_layer(name, device, stride, modes)]
    failed = [row for row in checks if row[6] == "FAIL"]
    table(f"Checks on {device.type} against float64 on the CPU, input {CHECK_SHAPE[device.type]} "
          f"(batch, channels, size), k = 3: {len(checks) - len(failed)} ok, {len(failed)} failed",
          ["layer", "stride", "mode", "quantity", "error / max |ref|", "tolerance", "verdict",
           "warnings"], checks, timed=False)
    if not args.no_timing:
        rows = [time_layer(name, shape, device, False, args) for name in args.layers
                for shape in TIME_SHAPES[device.type]]
        for shape in [] if args.no_compile else TIME_SHAPES[device.type]:
            for name in args.layers:
                if time.monotonic() - begin > args.budget:
                    rows.append([name, shape_label(shape), "compiled", "skipped (time budget)"])
                else:
                    rows.append(time_layer(name, shape, device, True, args))
        table(f"Times on {device.type} (median of {args.rounds} interleaved rounds; official = "
              "the official module with the same parameters)",
              ["layer", "input", "mode", "eval fwd (ms)", "train step (ms)", "eval / cbr",
               "train / cbr", "official / layer, eval", "official / layer, train"], rows,
              timed=True)
    if out:
        out.close()
    run.finish()
    print(f"{len(failed)} of {len(checks)} checks failed; {time.monotonic() - begin:.0f} s",
          flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
