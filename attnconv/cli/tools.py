"""``attnconv bench``, ``export`` and ``viz``: the complexity table, ONNX export and attention
figures of zoo networks (none of them imports the training wing)."""

from __future__ import annotations

import argparse

from attnconv.cli.training import _thread_count, set_threads


def _bench(args: argparse.Namespace) -> None:
    from attnconv.analysis.complexity import (
        benchmark_models,
        complexity_table,
        describe,
        memory_label,
    )

    set_threads(args)
    stats = benchmark_models(args.models, args.input_size, args.batch_size, device=args.device,
                             repeats=args.repeats, num_classes=args.num_classes)
    if args.format == "markdown":
        print(describe(args.input_size, args.batch_size, args.device, args.repeats) + "\n")
    print(complexity_table(stats, args.format, memory=memory_label(args.device)))


def _export(args: argparse.Namespace) -> None:
    from attnconv.classification.loading import load_model
    from attnconv.export import export_onnx

    model, size = load_model(args.model, args.checkpoint, num_classes=args.num_classes)
    report = export_onnx(model, args.output or f"{args.model}.onnx",
                         input_size=tuple(size or args.input_size), batch_size=args.batch_size,
                         opset=args.opset, atol=args.atol)
    print(report)


def _viz(args: argparse.Namespace) -> None:
    from attnconv.analysis.figures import visualize
    from attnconv.classification.loading import load_model

    model, input_size = load_model(args.model, args.checkpoint, num_classes=args.num_classes)
    size = args.size if args.size is not None else input_size[-1] if input_size else None
    figures = visualize(model, args.out, image=args.image, size=size, layer=args.layer)
    for figure in figures:
        print(f"wrote {figure.path}")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``bench``, ``export`` and ``viz``."""
    bench = sub.add_parser("bench", help="complexity table: params, MACs, speed, memory",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                           allow_abbrev=False)
    bench.add_argument("models", nargs="+", metavar="MODEL",
                       help="zoo, baseline or timm model names; ratios are to the first")
    bench.add_argument("--input-size", type=int, nargs=3, default=[3, 224, 224],
                       metavar=("C", "H", "W"), help="input size of one image")
    bench.add_argument("--batch-size", type=int, default=8, help="batch for the timings")
    bench.add_argument("--num-classes", type=int, default=1000, help="classifier width")
    bench.add_argument("--format", choices=("markdown", "csv"), default="markdown")
    bench.add_argument("--device", default="cpu", help="cpu or cuda")
    bench.add_argument("--repeats", type=int, default=5, help="timed runs per measurement")
    bench.add_argument("--threads", type=_thread_count, default=2, help="torch CPU threads")
    bench.set_defaults(func=_bench)

    export = sub.add_parser("export", help="ONNX with a dynamic batch, checked by onnxruntime",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                           allow_abbrev=False)
    export.add_argument("model", metavar="MODEL", help="zoo model name")
    export.add_argument("--output", help="ONNX file (default: MODEL.onnx)")
    export.add_argument("--checkpoint", help="`attnconv train` checkpoint or state dict")
    export.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    export.add_argument("--input-size", type=int, nargs=3, default=[3, 224, 224],
                        metavar=("C", "H", "W"), help="input size when the checkpoint has none")
    export.add_argument("--batch-size", type=int, default=2,
                        help="example batch; the check runs onnxruntime at batch + 1")
    export.add_argument("--num-classes", type=int, default=1000, help="classifier width")
    export.add_argument("--atol", type=float, default=1e-4,
                        help="largest accepted difference between ONNX and PyTorch")
    export.set_defaults(func=_export)

    viz = sub.add_parser("viz", help="figures of the attention of a model on one image",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                           allow_abbrev=False)
    viz.add_argument("--model", required=True, help="zoo model name")
    viz.add_argument("--checkpoint", help="`attnconv train` checkpoint or state dict")
    viz.add_argument("--image", help="image file (default: a portrait shipped with matplotlib)")
    viz.add_argument("--out", default="viz", help="folder for the PNG figures")
    viz.add_argument("--layer", help="module name to show (default: the first of each kind)")
    viz.add_argument("--size", type=int, help="image side (default: the model's input size)")
    viz.add_argument("--num-classes", type=int, default=1000, help="classifier width")
    viz.set_defaults(func=_viz)
