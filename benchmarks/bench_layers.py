"""Layer benchmarks: attention convs against nn.Conv2d (and, where one exists, the official
formulation), side by side in one process. Prints markdown tables for benchmarks/RESULTS.md.

    python benchmarks/bench_layers.py [--only aw] [--threads 2] [--repeats 20] [--device cpu]
"""

from __future__ import annotations

import argparse

import torch

from attnconv.demo import HEADERS, compare_aw_with_conv
from attnconv.profiling import machine_description, markdown_table

AW_SHAPES = [(1, 64, 56), (32, 64, 56), (32, 256, 14)]


def bench_aw(args: argparse.Namespace) -> None:
    print("## AWConv2d vs nn.Conv2d (k=3, stride 1, padding 1; AWConv2d.from_conv, "
          "random attention; the default path, then the other of chunked/grouped)\n")
    for batch, channels, size in AW_SHAPES:
        rows = compare_aw_with_conv(batch, channels, size, repeats=args.repeats,
                                    device=args.device, other_impls=("chunked", "grouped"))
        print(f"input ({batch}, {channels}, {size}, {size})\n")
        print(markdown_table(HEADERS, rows) + "\n")


SECTIONS = {"aw": bench_aw}


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
