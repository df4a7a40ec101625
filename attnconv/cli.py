"""The ``attnconv`` command: a thin layer over the library's functions of the same names."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from attnconv.training.commands import add_training_commands, run_command


def _bench(args: argparse.Namespace) -> None:
    from attnconv.bench import benchmark_models, complexity_table, describe, memory_label

    torch.set_num_threads(args.threads)
    stats = benchmark_models(args.models, args.input_size, args.batch_size, device=args.device,
                             repeats=args.repeats, num_classes=args.num_classes)
    if args.format == "markdown":
        print(describe(args.input_size, args.batch_size, args.device, args.repeats) + "\n")
    print(complexity_table(stats, args.format, memory=memory_label(args.device)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnconv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    add_training_commands(sub)

    bench = sub.add_parser("bench", help="complexity table: params, MACs, speed, memory",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    bench.add_argument("models", nargs="+", metavar="MODEL",
                       help="zoo, baseline or timm model names; ratios are to the first")
    bench.add_argument("--input-size", type=int, nargs=3, default=[3, 224, 224],
                       metavar=("C", "H", "W"), help="input size of one image")
    bench.add_argument("--batch-size", type=int, default=8, help="batch for the timings")
    bench.add_argument("--num-classes", type=int, default=1000, help="classifier width")
    bench.add_argument("--format", choices=("markdown", "csv"), default="markdown")
    bench.add_argument("--device", default="cpu", help="cpu or cuda")
    bench.add_argument("--repeats", type=int, default=5, help="timed runs per measurement")
    bench.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    bench.set_defaults(func=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    run_command(args)


if __name__ == "__main__":
    main()
