"""The RFA family against the official modules and conv + BN + ReLU, in interleaved rounds.

    python benchmarks/bench_rfa_fused.py [--layers rfa rfcbam rfca] [--threads 1 2]
                                         [--rounds 7] [--quick] [--allow-load]

For each layer at (8, 64, 56, 56) stride 1 and (32, 128, 28, 28) stride 2 (k = 3, C_out = C_in):
conv + BN + ReLU of the same shape, the official module with the same parameters, the layer's
eager path and its fused kernel (``impl="eager"`` / ``impl="fused"``); the eval forward (no
autograd), the training step (forward + backward of out.sum(), train mode), the bytes autograd
keeps for backward, and with several ``--threads`` the speed-up over the first thread count.
``--quick`` uses tiny shapes (a smoke test of the script, not a figure).
"""

from __future__ import annotations

import argparse
import warnings

import harness
import torch
from torch import nn

from attnconv import create_conv
from attnconv.analysis.profiling import forward_fn, saved_tensor_bytes, train_step_fn
from attnconv.testing.reference_rfa import OfficialRFAConv, OfficialRFCAConv, OfficialRFCBAMConv

SHAPES = [(8, 64, 56, 1), (32, 128, 28, 2)]  # (batch, channels, size, stride), k = 3
QUICK_SHAPES = [(2, 8, 8, 1), (2, 8, 8, 2)]
OFFICIAL = {"rfa": OfficialRFAConv, "rfcbam": OfficialRFCBAMConv, "rfca": OfficialRFCAConv}
BASELINE, OFFICIAL_NAME = "conv + BN + ReLU", "official"
HEADERS = ["candidate", "threads", "eval fwd (ms)", "train step (ms)", "eval / cbr",
           "train / cbr", "official / this, eval", "official / this, train",
           "saved for bwd / input"]
SCALING = ["eval speed-up", "train speed-up"]


def candidates(name: str, channels: int, stride: int) -> dict[str, nn.Module]:
    official = OFFICIAL[name](channels, channels, 3, stride)
    eager = create_conv(name, channels, channels, 3, stride, impl="eager")
    eager.load_official_state_dict(official.state_dict())
    fused = create_conv(name, channels, channels, 3, stride, impl="fused")
    fused.load_state_dict(eager.state_dict())
    plain = nn.Sequential(nn.Conv2d(channels, channels, 3, stride, 1), nn.BatchNorm2d(channels),
                          nn.ReLU())
    return {BASELINE: plain, OFFICIAL_NAME: official, f"{name} eager": eager,
            f"{name} fused": fused}


def check_fused_runs(module: nn.Module, x: torch.Tensor) -> None:
    """SystemExit when ``impl="fused"`` falls back to the eager path here (it warns then):
    the figures would be labelled with a kernel that did not run."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        forward_fn(module, x)()
    for warning in caught:
        if issubclass(warning.category, RuntimeWarning):
            raise SystemExit(f"the fused kernel does not run here: {warning.message}")


def bench(run: harness.Run, name: str, shape: tuple[int, int, int, int],
          args: argparse.Namespace) -> None:
    batch, channels, size, stride = shape
    torch.manual_seed(0)
    x = torch.randn(batch, channels, size, size)
    modules = candidates(name, channels, stride)
    check_fused_runs(modules[f"{name} fused"], x)
    saved = {k: saved_tensor_bytes(m, x) / (x.numel() * x.element_size())
             for k, m in modules.items()}
    rows, first = [], {}
    for threads in args.threads:
        fwd = harness.measure({k: forward_fn(m, x) for k, m in modules.items()},
                              rounds=args.rounds, warmup=args.warmup, threads=threads)
        train = harness.measure({k: train_step_fn(m, x) for k, m in modules.items()},
                                rounds=args.rounds, warmup=args.warmup, threads=threads)
        for key in modules:
            first.setdefault(key, (fwd.median(key), train.median(key)))
            rows.append([key, threads, fwd.median(key) * 1e3, train.median(key) * 1e3,
                         fwd.ratio(key, BASELINE), train.ratio(key, BASELINE),
                         fwd.ratio(OFFICIAL_NAME, key), train.ratio(OFFICIAL_NAME, key),
                         saved[key]])
            if len(args.threads) > 1:
                rows[-1] += [first[key][0] / fwd.median(key), first[key][1] / train.median(key)]
    run.table(f"{name}, input ({batch}, {channels}, {size}, {size}), stride {stride}, k = 3 "
              f"(median of {args.rounds} interleaved rounds; speed-up over "
              f"{args.threads[0]} thread{'s' * (args.threads[0] != 1)})",
              HEADERS + SCALING * (len(args.threads) > 1), rows,
              threads=max(args.threads))


def main(argv: list[str] | None = None) -> None:
    parser = harness.parser(__doc__)
    parser.add_argument("--layers", nargs="+", choices=list(OFFICIAL), default=list(OFFICIAL))
    parser.add_argument("--quick", action="store_true", help="tiny shapes (smoke test)")
    args = parser.parse_args(argv)
    run = harness.start(args)
    for name in args.layers:
        for shape in QUICK_SHAPES if args.quick else SHAPES:
            bench(run, name, shape, args)
    run.finish()


if __name__ == "__main__":
    main()
