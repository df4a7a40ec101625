"""Layer benchmarks: attention convs against nn.Conv2d (and, where one exists, the official
formulation), side by side in one process. Prints markdown tables for benchmarks/RESULTS.md.

    python benchmarks/bench_layers.py [--only aw|rfa|precision] [--threads 2] [--repeats 20]
                                      [--device cpu]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch import nn

from attnconv import AWConv2d, RFAConv2d, RFCAConv2d, RFCBAMConv2d, create_conv
from attnconv.profiling import (
    count_macs,
    count_params,
    forward_fn,
    machine_description,
    markdown_table,
    median_times,
    saved_tensor_bytes,
    train_step_fn,
)

# the faithful official modules live with the tests (one copy, shared)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference_rfa import (
    OfficialRFAConv,
    OfficialRFCAConv,
    OfficialRFCBAMConv,
)

HEADERS = ("layer", "params", "MACs (M)", "fwd (ms)", "fwd+bwd (ms)", "fwd ratio",
           "fwd+bwd ratio", "max abs diff at init")


def compare_aw_with_conv(batch: int, channels: int, size: int, kernel_size: int = 3, *,
                         repeats: int = 10, seed: int = 0,
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
    fwd = median_times({k: forward_fn(m, x) for k, m in layers.items()}, repeats=repeats)
    train = median_times({k: train_step_fn(m, x) for k, m in layers.items()}, repeats=repeats)
    rows = []
    for name, layer in layers.items():
        rows.append((name, count_params(layer), count_macs(layer, x) / 1e6,
                     fwd[name] * 1e3, train[name] * 1e3, fwd[name] / fwd["nn.Conv2d"],
                     train[name] / train["nn.Conv2d"], diffs[name]))
    return rows


AW_SHAPES = [(1, 64, 56), (32, 64, 56), (32, 256, 14)]


def bench_aw(args: argparse.Namespace) -> None:
    print("## AWConv2d vs nn.Conv2d (k=3, stride 1, padding 1; AWConv2d.from_conv, "
          "random attention; the default path, then the other of chunked/grouped)\n")
    for batch, channels, size in AW_SHAPES:
        rows = compare_aw_with_conv(batch, channels, size, repeats=args.repeats,
                                    device=args.device, other_impls=("chunked", "grouped"))
        print(f"input ({batch}, {channels}, {size}, {size})\n")
        print(markdown_table(HEADERS, rows) + "\n")


RFA_SHAPES = [(8, 64, 56, 1), (32, 128, 28, 2)]  # (batch, channels, size, stride), k = 3
RFA_PAIRS = [(RFAConv2d, OfficialRFAConv), (RFCBAMConv2d, OfficialRFCBAMConv),
             (RFCAConv2d, OfficialRFCAConv)]
RFA_HEADERS = ["layer", "fwd (ms)", "fwd+bwd (ms)", "fwd: ref / layer", "fwd+bwd: ref / layer",
               "fwd / conv", "fwd+bwd / conv", "saved for bwd / input"]


def bench_rfa(args: argparse.Namespace) -> None:
    print("## RFA family vs the faithful official module and nn.Conv2d (k=3, C_out = C_in; "
          "forward in eval mode without autograd, forward+backward in train mode)\n")
    for batch, channels, size, stride in RFA_SHAPES:
        x = torch.randn(batch, channels, size, size, device=args.device)
        conv = nn.Conv2d(channels, channels, 3, stride, 1, device=args.device)
        for layer_cls, official_cls in RFA_PAIRS:
            official = official_cls(channels, channels, 3, stride).to(args.device)
            layer = layer_cls(channels, channels, 3, stride, device=args.device)
            layer.load_official_state_dict(official.state_dict())
            candidates = {"reference (official)": official, layer_cls.__name__: layer,
                          "nn.Conv2d": conv}
            fwd = median_times({k: forward_fn(m, x) for k, m in candidates.items()},
                               repeats=args.repeats, warmup=1)
            train = median_times({k: train_step_fn(m, x) for k, m in candidates.items()},
                                 repeats=args.repeats, warmup=1)
            ref, plain = "reference (official)", "nn.Conv2d"
            rows = [[name, fwd[name] * 1e3, train[name] * 1e3, fwd[ref] / fwd[name],
                     train[ref] / train[name], fwd[name] / fwd[plain],
                     train[name] / train[plain],
                     saved_tensor_bytes(m, x) / (x.numel() * x.element_size())]
                    for name, m in candidates.items()]
            print(f"{layer_cls.__name__}, input ({batch}, {channels}, {size}, {size}), "
                  f"stride {stride}\n")
            print(markdown_table(RFA_HEADERS, rows) + "\n", flush=True)


PRECISION_LAYERS = ["conv", "aw", "rfa", "rfcbam", "rfca", "camconv", "cbamconv", "caconv"]
PRECISION_HEADERS = ["layer", "mode", "bf16 out", "fp16 out", "bf16 grad x", "fp16 grad x",
                     "bf16 grad W", "fp16 grad W"]


def _relative_error(low: torch.Tensor, ref: torch.Tensor) -> float:
    return ((low.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def bench_precision(args: argparse.Namespace) -> None:
    """Not a timing: the largest |autocast - fp32| over the largest |fp32| of each layer's
    output, input gradient and weight gradient (random parameters, AW's attention included)."""
    print("## Autocast bf16 / fp16 vs float32, per layer (largest error / largest |fp32 value|; "
          "(8, 32, 16, 16) input, k=3, C_out = 32, random parameters, same module state)\n")
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
    print(markdown_table(PRECISION_HEADERS, rows) + "\n", flush=True)


SECTIONS = {"aw": bench_aw, "rfa": bench_rfa, "precision": bench_precision}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(SECTIONS), action="append",
                        help="run only these sections (repeatable); default: all")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {machine_description(args.device)}, "
          f"median of {args.repeats} runs\n")
    for name in args.only or SECTIONS:
        SECTIONS[name](args)


if __name__ == "__main__":
    main()
