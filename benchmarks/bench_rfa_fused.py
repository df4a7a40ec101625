"""Fused RFA-family kernels (issue 13) against the official modules, the eager layers and
conv + BN + ReLU, side by side in one process (interleaved rounds, medians).

    python benchmarks/bench_rfa_fused.py [--threads 2] [--repeats 10] [--models]
                                         [--layers RFAConv2d RFCBAMConv2d RFCAConv2d]

Prints markdown tables for benchmarks/RESULTS.md: per shape the eval forward, the training
step (forward + backward of out.sum(), train mode) and the bytes autograd keeps for backward;
with ``--models``, resnet18 against resnet18_rfa (fused and eager) at 224 px, batch 8.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

from attnconv import RFAConv2d, RFCAConv2d, RFCBAMConv2d
from attnconv.ops import fused_available
from attnconv.profiling import (
    forward_fn,
    machine_description,
    markdown_table,
    median_times,
    saved_tensor_bytes,
    train_step_fn,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference_rfa import OfficialRFAConv, OfficialRFCAConv, OfficialRFCBAMConv

SHAPES = [(8, 64, 56, 1), (32, 128, 28, 2)]  # (batch, channels, size, stride), k = 3
LAYERS = {"RFAConv2d": (OfficialRFAConv, RFAConv2d),
          "RFCBAMConv2d": (OfficialRFCBAMConv, RFCBAMConv2d),
          "RFCAConv2d": (OfficialRFCAConv, RFCAConv2d)}
HEADERS = ["candidate", "eval fwd (ms)", "train step (ms)", "official / this, fwd",
           "official / this, train", "this / conv-BN-ReLU, train", "saved for bwd / input"]


def bench_layers(repeats: int, names: list[str]) -> None:
    for name in names:
        official_cls, cls = LAYERS[name]
        for batch, channels, size, stride in SHAPES:
            x = torch.randn(batch, channels, size, size)
            official = official_cls(channels, channels, 3, stride)
            fused = cls(channels, channels, 3, stride, impl="fused")
            fused.load_official_state_dict(official.state_dict())
            eager = cls(channels, channels, 3, stride, impl="eager")
            eager.load_state_dict(fused.state_dict())
            plain = nn.Sequential(nn.Conv2d(channels, channels, 3, stride, 1),
                                  nn.BatchNorm2d(channels), nn.ReLU())
            candidates = {"official": official, f"{name} eager": eager,
                          f"{name} fused": fused, "conv + BN + ReLU": plain}
            fwd = median_times({k: forward_fn(m, x) for k, m in candidates.items()},
                               repeats=repeats, warmup=1)
            train = median_times({k: train_step_fn(m, x) for k, m in candidates.items()},
                                 repeats=repeats, warmup=1)
            rows = [[key, fwd[key] * 1e3, train[key] * 1e3, fwd["official"] / fwd[key],
                     train["official"] / train[key], train[key] / train["conv + BN + ReLU"],
                     saved_tensor_bytes(m, x) / (x.numel() * x.element_size())]
                    for key, m in candidates.items()]
            print(f"{name}, input ({batch}, {channels}, {size}, {size}), stride {stride}\n")
            print(markdown_table(HEADERS, rows) + "\n", flush=True)


def bench_models(repeats: int) -> None:
    from attnconv.ops import set_rfa_impl
    from attnconv.training.models import build_model

    x = torch.randn(8, 3, 224, 224)
    base = build_model("resnet18", 1000, 3)
    rfa_net = build_model("resnet18_rfa", 1000, 3)

    def with_impl(fn, impl):
        def run():
            set_rfa_impl(impl)
            try:
                return fn()
            finally:
                set_rfa_impl("auto")
        return run

    fns = {"resnet18": train_step_fn(base, x),
           "resnet18_rfa fused": with_impl(train_step_fn(rfa_net, x), "fused"),
           "resnet18_rfa eager": with_impl(train_step_fn(rfa_net, x), "eager")}
    train = median_times(fns, repeats=repeats, warmup=1)
    fwd = median_times({"resnet18": forward_fn(base, x),
                        "resnet18_rfa fused": with_impl(forward_fn(rfa_net, x), "fused"),
                        "resnet18_rfa eager": with_impl(forward_fn(rfa_net, x), "eager")},
                       repeats=repeats, warmup=1)
    rows = [[name, fwd[name] * 1e3, train[name] * 1e3, fwd[name] / fwd["resnet18"],
             train[name] / train["resnet18"]] for name in fns]
    print("models, input (8, 3, 224, 224)\n")
    print(markdown_table(["model", "eval fwd (ms)", "train step (ms)", "fwd / resnet18",
                          "train / resnet18"], rows) + "\n", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--models", action="store_true", help="also the resnet18 comparison")
    parser.add_argument("--no-layers", action="store_true")
    parser.add_argument("--layers", nargs="+", choices=list(LAYERS), default=list(LAYERS),
                        help="which layers (default: all three)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    reason = fused_available()
    if reason is not None:
        raise SystemExit(f"the fused kernel is unavailable: {reason}")
    print(f"torch {torch.__version__}, {machine_description()}, median of {args.repeats} "
          f"interleaved rounds\n")
    if not args.no_layers:
        bench_layers(args.repeats, args.layers)
    if args.models:
        bench_models(args.repeats)


if __name__ == "__main__":
    main()
