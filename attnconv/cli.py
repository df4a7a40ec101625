"""The ``attnconv`` command: a thin layer over the library's functions of the same names."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch


def _demo(args: argparse.Namespace) -> None:
    from attnconv.demo import HEADERS, compare_aw_with_conv
    from attnconv.profiling import markdown_table

    torch.set_num_threads(args.threads)
    print(f"AWConv2d vs nn.Conv2d, input ({args.batch}, {args.channels}, {args.size}, "
          f"{args.size}), kernel 3, {args.threads} threads, median of {args.repeats} runs\n")
    rows = compare_aw_with_conv(args.batch, args.channels, args.size, repeats=args.repeats)
    print(markdown_table(HEADERS, rows))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnconv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="compare AWConv2d with nn.Conv2d on a ResNet layer shape",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    demo.add_argument("--batch", type=int, default=16, help="batch size")
    demo.add_argument("--channels", type=int, default=128, help="input and output channels")
    demo.add_argument("--size", type=int, default=28, help="input height and width")
    demo.add_argument("--repeats", type=int, default=10, help="timed runs per measurement")
    demo.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    demo.set_defaults(func=_demo)

    from attnconv.detection.cli import add_detection_parsers
    add_detection_parsers(sub)  # train-det, eval-det
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
