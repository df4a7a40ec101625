"""The fused RFA kernels phase by phase, beside the floors they are measured against.

    python benchmarks/bench_rfa_phases.py [--threads 1 2] [--rounds 7] [--quick] [--allow-load]

For (8, 64, 56, 56) stride 1 and (32, 128, 28, 28) stride 2 (k = 3, C_out = C_in), in the same
interleaved rounds: conv + BN + ReLU (the baseline); the tile GEMM's floor (one torch.mm of the
(positions, k2 * C) features by the final conv, the multiply-adds of the 3x3 conv it replaces);
the features pass (``rfa_feature_stats``: every position's depthwise features, summed); and each
operator of the three layers: RFAConv's forward and backward, RFCBAM/RFCA's reduction and
product passes and their backward passes as a training step runs them (the product backward
hands its share of dL/du to the reduction backward, which runs the BN + depthwise backward and
the dx gather once for both). What a forward costs beyond features + GEMM is its
attention and product; what a backward costs beyond two features passes and two GEMMs is its
BN, depthwise and input-gradient passes.
"""

from __future__ import annotations

import harness
import torch

from attnconv import RFAConv2d, RFCAConv2d, RFCBAMConv2d
from attnconv.ops import ensure_loaded, rfa_feature_stats, rfa_fused, rfa_tile_attend
from attnconv.ops.rfa import rfa_fused_backward
from attnconv.ops.rfa_tile import (
    rfa_tile_attend_backward,
    rfa_tile_reduce,
    rfa_tile_reduce_backward,
)

SHAPES = [(8, 64, 56, 1), (32, 128, 28, 2)]
QUICK_SHAPES = [(2, 8, 8, 1), (2, 8, 8, 2)]


def phases(batch: int, channels: int, size: int, stride: int) -> dict[str, object]:
    """name -> a no-argument callable, every phase on the same input and parameters."""
    torch.manual_seed(0)
    x = torch.randn(batch, channels, size, size).contiguous(memory_format=torch.channels_last)
    cbr = torch.nn.Sequential(torch.nn.Conv2d(channels, channels, 3, stride, 1),
                              torch.nn.BatchNorm2d(channels), torch.nn.ReLU()).eval()
    rfa = RFAConv2d(channels, channels, 3, stride, impl="fused").eval()
    bn = rfa.feature_bn
    # the operators take the layer's tensors as it holds them
    common = (x, rfa.feature_conv.weight.detach(), bn.weight.detach(), bn.bias.detach(),
              bn.running_mean, bn.running_var)
    a, weight, bias = (rfa.attn_logit_scale.detach(), rfa.weight.detach(), rfa.bias.detach())
    out_size = (size - 1) // stride + 1
    positions, features = batch * out_size * out_size, channels * 9
    attended = torch.randn(positions, features)
    wt = weight.reshape(channels, features)
    grad = torch.randn(batch, channels, out_size, out_size).contiguous(
        memory_format=torch.channels_last)
    s = stride
    calls = {
        "conv + BN + ReLU": lambda: cbr(x),
        "GEMM floor (torch.mm)": lambda: attended @ wt.t(),
        "features pass (rfa_feature_stats)": lambda: rfa_feature_stats(x, common[1], s),
        "rfa: forward": lambda: rfa_fused(*common, a, weight, bias, s, False, 1e-5),
        "rfa: backward": lambda: rfa_fused_backward(grad, *common, a, weight, True, s, True,
                                                    1e-5),
    }
    for name, cls, kind in (("rfcbam", RFCBAMConv2d, 0), ("rfca", RFCAConv2d, 1)):
        layer = cls(channels, channels, 3, stride, impl="fused").eval()
        with torch.no_grad():
            r1, r2, _ = rfa_tile_reduce(*common, s, kind, False, 1e-5)
            f1, f2 = layer._factors(x, r1, r2)
            # the attend op's share of dL/du, as its backward hands it on in training
            du = rfa_tile_attend_backward(grad, *common, f1, f2, weight, True, s, kind, True,
                                          True, 1e-5)[-1]
        calls.update({
            f"{name}: reduction pass": lambda kind=kind: rfa_tile_reduce(*common, s, kind, False,
                                                                         1e-5),
            f"{name}: product + GEMM pass": lambda kind=kind, f1=f1, f2=f2: rfa_tile_attend(
                *common, f1, f2, weight, bias, None, s, kind, False, 1e-5),
            f"{name}: product backward (tail handed on)": lambda kind=kind, f1=f1, f2=f2: (
                rfa_tile_attend_backward(grad, *common, f1, f2, weight, True, s, kind, True,
                                         True, 1e-5)),
            f"{name}: reduction backward + the tail": lambda kind=kind, r1=r1, r2=r2, du=du: (
                rfa_tile_reduce_backward(torch.ones_like(r1), torch.ones_like(r2), du, *common,
                                         s, kind, True, 1e-5)),
        })
    return calls


def main(argv: list[str] | None = None) -> None:
    parser = harness.parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny shapes (smoke test)")
    args = parser.parse_args(argv)
    reason = ensure_loaded()
    if reason is not None:
        raise SystemExit(f"the fused kernels are not available here: {reason}")
    run = harness.start(args)
    for batch, channels, size, stride in QUICK_SHAPES if args.quick else SHAPES:
        calls = phases(batch, channels, size, stride)
        with torch.no_grad():
            for threads in args.threads:
                timings = harness.measure(calls, rounds=args.rounds, warmup=args.warmup,
                                          threads=threads)
                rows = [[name, timings.median(name) * 1e3,
                         timings.ratio(name, "conv + BN + ReLU"),
                         timings.ratio(name, "GEMM floor (torch.mm)")] for name in calls]
                run.table(f"phases at ({batch}, {channels}, {size}, {size}), stride {stride}, "
                          f"{threads} thread{'s' * (threads != 1)} (median of {args.rounds} "
                          "interleaved rounds)",
                          ["phase", "ms", "/ cbr", "/ GEMM floor"], rows, threads=threads)
    run.finish()


if __name__ == "__main__":
    main()
