"""Layer benchmarks: attention convs against nn.Conv2d (and, where one exists, the official
formulation), side by side in interleaved rounds in one process. Prints markdown tables for
benchmarks/RESULTS.md.

    python benchmarks/bench_layers.py [--only aw|rfa|precision] [--threads 2] [--rounds 20]
                                      [--device cpu] [--quick] [--allow-load]

The precision section is not a timing: it runs whatever the load.
"""

from __future__ import annotations

import argparse
import copy

import harness
import torch
from torch import nn

from attnconv import AWConv2d, RFAConv2d, RFCAConv2d, RFCBAMConv2d, create_conv
from attnconv.analysis.profiling import (
    count_macs,
    count_params,
    forward_fn,
    saved_tensor_bytes,
    train_step_fn,
)
from attnconv.testing.reference_rfa import OfficialRFAConv, OfficialRFCAConv, OfficialRFCBAMConv

HEADERS = ("layer", "params", "MACs (M)", "fwd (ms)", "fwd+bwd (ms)", "fwd ratio",
           "fwd+bwd ratio", "max abs diff at init")


def compare_aw_with_conv(batch: int, channels: int, size: int, kernel_size: int = 3, *,
                         rounds: int = 10, warmup: int = 2, seed: int = 0,
                         device: torch.device | str = "cpu",
                         other_impls: tuple[str, ...] = ()) -> list[tuple]:
    """Rows of :data:`HEADERS` for nn.Conv2d and the AWConv2d made from it (``from_conv``).

    The AWConv2d row uses the default path; ``other_impls`` adds a row per other named ``impl``.

    The AW layer's attention is then given random weights, so the timing covers real work;
    the difference column is measured before that, where it must be zero.
    """
    torch.manual_seed(seed)
    conv = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, device=device)
    aw = AWConv2d.from_conv(conv)
    x = torch.randn(batch, channels, size, size, device=device)
    default = aw.resolved_impl(x)
    layers: dict[str, nn.Module] = {"nn.Conv2d": conv, f"AWConv2d ({aw.impl}: {default})": aw}
    layers |= {f"AWConv2d ({impl})": AWConv2d.from_conv(conv, impl=impl)
               for impl in other_impls if impl != default}
    with torch.no_grad():
        diffs = {k: (m(x) - conv(x)).abs().max().item() for k, m in layers.items()}
        nn.init.normal_(aw.pointconv2.weight, std=0.02)
        for layer in layers.values():
            if isinstance(layer, AWConv2d):
                layer.load_state_dict(aw.state_dict())
    fwd = harness.measure({k: forward_fn(m, x) for k, m in layers.items()}, rounds=rounds,
                          warmup=warmup)
    train = harness.measure({k: train_step_fn(m, x) for k, m in layers.items()}, rounds=rounds,
                            warmup=warmup)
    rows = []
    for name, layer in layers.items():
        rows.append((name, count_params(layer), count_macs(layer, x) / 1e6,
                     fwd.median(name) * 1e3, train.median(name) * 1e3,
                     fwd.ratio(name, "nn.Conv2d"), train.ratio(name, "nn.Conv2d"), diffs[name]))
    return rows


AW_SHAPES = [(1, 64, 56), (32, 64, 56), (32, 256, 14)]
QUICK_AW_SHAPES = [(2, 8, 8)]


def bench_aw(run: harness.Run, args: argparse.Namespace) -> None:
    for batch, channels, size in QUICK_AW_SHAPES if args.quick else AW_SHAPES:
        rows = compare_aw_with_conv(batch, channels, size, rounds=args.rounds,
                                    warmup=args.warmup, device=args.device,
                                    other_impls=("chunked", "grouped"))
        run.table(f"AWConv2d vs nn.Conv2d, input ({batch}, {channels}, {size}, {size}) (k=3, "
                  "stride 1, padding 1; AWConv2d.from_conv, random attention; the default path, "
                  f"then the other of chunked/grouped; median of {args.rounds} rounds)",
                  HEADERS, rows)


RFA_SHAPES = [(8, 64, 56, 1), (32, 128, 28, 2)]  # (batch, channels, size, stride), k = 3
QUICK_RFA_SHAPES = [(2, 8, 8, 1)]
RFA_PAIRS = [(RFAConv2d, OfficialRFAConv), (RFCBAMConv2d, OfficialRFCBAMConv),
             (RFCAConv2d, OfficialRFCAConv)]
RFA_HEADERS = ["layer", "fwd (ms)", "fwd+bwd (ms)", "fwd: ref / layer", "fwd+bwd: ref / layer",
               "fwd / conv", "fwd+bwd / conv", "saved for bwd / input"]


def bench_rfa(run: harness.Run, args: argparse.Namespace) -> None:
    for batch, channels, size, stride in QUICK_RFA_SHAPES if args.quick else RFA_SHAPES:
        x = torch.randn(batch, channels, size, size, device=args.device)
        conv = nn.Conv2d(channels, channels, 3, stride, 1, device=args.device)
        for layer_cls, official_cls in RFA_PAIRS:
            official = official_cls(channels, channels, 3, stride).to(args.device)
            layer = layer_cls(channels, channels, 3, stride, device=args.device)
            layer.load_official_state_dict(official.state_dict())
            candidates = {"reference (official)": official, layer_cls.__name__: layer,
                          "nn.Conv2d": conv}
            fwd = harness.measure({k: forward_fn(m, x) for k, m in candidates.items()},
                                  rounds=args.rounds, warmup=args.warmup)
            train = harness.measure({k: train_step_fn(m, x) for k, m in candidates.items()},
                                    rounds=args.rounds, warmup=args.warmup)
            ref, plain = "reference (official)", "nn.Conv2d"
            rows = [[name, fwd.median(name) * 1e3, train.median(name) * 1e3,
                     fwd.ratio(ref, name), train.ratio(ref, name), fwd.ratio(name, plain),
                     train.ratio(name, plain),
                     saved_tensor_bytes(m, x) / (x.numel() * x.element_size())]
                    for name, m in candidates.items()]
            run.table(f"{layer_cls.__name__} vs the faithful official module and nn.Conv2d, "
                      f"input ({batch}, {channels}, {size}, {size}), stride {stride} (k=3, "
                      "C_out = C_in; forward in eval mode without autograd, forward+backward "
                      f"in train mode; median of {args.rounds} rounds)", RFA_HEADERS, rows)


PRECISION_LAYERS = ["conv", "aw", "rfa", "rfcbam", "rfca", "camconv", "cbamconv", "caconv"]
PRECISION_HEADERS = ["layer", "mode", "bf16 out", "fp16 out", "bf16 grad x", "fp16 grad x",
                     "bf16 grad W", "fp16 grad W"]


def _relative_error(low: torch.Tensor, ref: torch.Tensor) -> float:
    return ((low.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def bench_precision(run: harness.Run, args: argparse.Namespace) -> None:
    """Not a timing: the largest |autocast - fp32| over the largest |fp32| of each layer's
    output, input gradient and weight gradient (random parameters, AW's attention included)."""
    rows = []
    for name in PRECISION_LAYERS:
        for train in (True, False):
            torch.manual_seed(0)
            layer = create_conv(name, 32, 32, 3, padding=1).to(args.device).train(train)
            with torch.no_grad():
                for p in layer.parameters():
                    p.copy_(torch.randn_like(p) * 0.3)
            x = torch.randn(8, 32, 16, 16, device=args.device)
            results = {}
            for precision in (None, torch.bfloat16, torch.float16):
                module = copy.deepcopy(layer)
                xi = x.clone().requires_grad_(True)
                with torch.autocast(x.device.type, dtype=precision or torch.bfloat16,
                                    enabled=precision is not None):
                    out = module(xi)
                # a fixed random upstream gradient of order 1 (a loss's mean would scale it
                # into fp16's subnormals, which is GradScaler's job)
                out.float().backward(torch.randn(out.shape, generator=torch.Generator(
                    ).manual_seed(1)).to(out.device))
                results[precision] = (out.detach(), xi.grad, module.weight.grad)
            ref = results[None]
            errors = {p: [_relative_error(a, b) for a, b in zip(results[p], ref, strict=True)]
                      for p in (torch.bfloat16, torch.float16)}
            bf, fp = errors[torch.bfloat16], errors[torch.float16]
            rows.append([name, "train" if train else "eval", f"{bf[0]:.1e}", f"{fp[0]:.1e}",
                         f"{bf[1]:.1e}", f"{fp[1]:.1e}", f"{bf[2]:.1e}", f"{fp[2]:.1e}"])
    run.table("Autocast bf16 / fp16 vs float32, per layer (largest error / largest |fp32 value|; "
              "(8, 32, 16, 16) input, k=3, C_out = 32, random parameters, same module state)",
              PRECISION_HEADERS, rows, timed=False)


SECTIONS = {"aw": bench_aw, "rfa": bench_rfa, "precision": bench_precision}


def main(argv: list[str] | None = None) -> None:
    parser = harness.parser(__doc__)
    parser.set_defaults(rounds=20)
    parser.add_argument("--only", choices=sorted(SECTIONS), action="append",
                        help="run only these sections (repeatable); default: all")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="one tiny shape (smoke test)")
    args = parser.parse_args(argv)
    if len(args.threads) != 1:
        parser.error("--threads takes one value here")
    torch.set_num_threads(args.threads[0])
    sections = args.only or list(SECTIONS)
    run = harness.start(args, timed=set(sections) != {"precision"})
    for name in sections:
        SECTIONS[name](run, args)
    run.finish()


if __name__ == "__main__":
    main()
