"""resnet18_rfa against resnet18, in PyTorch and exported to onnxruntime, interleaved rounds.

    python benchmarks/bench_models.py [--threads 2] [--rounds 7] [--onnx-threads 2]
                                      [--no-onnx] [--quick] [--allow-load]

PyTorch: the training step (forward + backward of out.sum(), train mode) and inference (eval
forward, no autograd) at batch 8, 224 px, for ``resnet18``, ``resnet18_rfa`` (its RFA layers
on their default ``impl="auto"``) and ``resnet18_rfa`` with ``impl="eager"``; the models are
built as ``attnconv.create_model`` (timm's registry names) builds them.
onnxruntime: both networks exported with ``attnconv.export.export_onnx`` (checked against
PyTorch), run on the CPU provider at (4, 3, 224, 224) with ``--onnx-threads`` intra-op threads.
``--quick`` uses narrow networks on tiny images (a smoke test of the script, not a figure).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import harness
import torch
from torch import nn

from attnconv import create_model
from attnconv.analysis.profiling import forward_fn, train_step_fn
from attnconv.export import export_onnx
from attnconv.models import MODEL_ARGS

PLAIN, RFA = "resnet18", "resnet18_rfa"
QUICK_ARGS = dict(channels=(8, 16, 32, 64), num_classes=10)


def build(args: argparse.Namespace) -> dict[str, nn.Module]:
    kwargs = QUICK_ARGS if args.quick else {}
    torch.manual_seed(0)
    rfa = create_model(RFA, **kwargs)
    conv_args = {**MODEL_ARGS[RFA].get("conv_args", {}), "impl": "eager"}
    eager = create_model(RFA, conv_args=conv_args, **kwargs)
    eager.load_state_dict(rfa.state_dict())
    return {PLAIN: create_model(PLAIN, **kwargs), RFA: rfa, f"{RFA} eager": eager}


def bench_torch(run: harness.Run, models: dict[str, nn.Module], args: argparse.Namespace) -> None:
    x = torch.randn(args.batch, 3, args.size, args.size)
    rows = []
    for threads in args.threads:
        train = harness.measure({k: train_step_fn(m, x) for k, m in models.items()},
                                rounds=args.rounds, warmup=args.warmup, threads=threads)
        infer = harness.measure({k: forward_fn(m, x) for k, m in models.items()},
                                rounds=args.rounds, warmup=args.warmup, threads=threads)
        rows += [[name, threads, train.median(name) * 1e3, train.ratio(name, PLAIN),
                  infer.median(name) * 1e3, infer.ratio(name, PLAIN),
                  infer.median(PLAIN) / infer.median(name)] for name in models]
    run.table(f"PyTorch, input ({args.batch}, 3, {args.size}, {args.size}) (median of "
              f"{args.rounds} interleaved rounds)",
              ["model", "threads", "train step (ms)", "train / resnet18", "inference (ms)",
               "inference / resnet18", "throughput / resnet18"], rows, threads=max(args.threads))


def bench_onnx(run: harness.Run, models: dict[str, nn.Module], args: argparse.Namespace) -> None:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.onnx_threads
    options.inter_op_num_threads = 1
    x = torch.randn(args.onnx_batch, 3, args.size, args.size).numpy()
    sessions, diffs = {}, {}
    with tempfile.TemporaryDirectory() as folder:
        for name in (PLAIN, RFA):
            report = export_onnx(models[name], Path(folder) / f"{name}.onnx",
                                 input_size=(3, args.size, args.size))
            diffs[name] = report.max_abs_diff
            sessions[name] = ort.InferenceSession(str(report.path), options,
                                                  providers=["CPUExecutionProvider"])

    def infer(session: ort.InferenceSession):
        feed = {session.get_inputs()[0].name: x}
        return lambda: session.run(None, feed)

    times = harness.measure({k: infer(s) for k, s in sessions.items()}, rounds=args.rounds,
                            warmup=args.warmup)
    rows = [[name, times.median(name) * 1e3, times.ratio(name, PLAIN), diffs[name]]
            for name in sessions]
    run.table(f"onnxruntime {ort.__version__} (CPU provider, {args.onnx_threads} intra-op "
              f"threads), input ({args.onnx_batch}, 3, {args.size}, {args.size}) (median of "
              f"{args.rounds} interleaved rounds)",
              ["model", "inference (ms)", "time / resnet18", "largest |ONNX - PyTorch|"], rows,
              threads=args.onnx_threads)


def main(argv: list[str] | None = None) -> None:
    parser = harness.parser(__doc__)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224, help="image side (px)")
    parser.add_argument("--onnx-batch", type=int, default=4)
    parser.add_argument("--onnx-threads", type=int, default=2)
    parser.add_argument("--no-onnx", action="store_true", help="PyTorch only")
    parser.add_argument("--quick", action="store_true",
                        help="narrow networks, batch 2, 32 px (smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.onnx_batch, args.size = 2, 2, 32
    run = harness.start(args)
    models = build(args)
    bench_torch(run, models, args)
    if not args.no_onnx:
        bench_onnx(run, models, args)
    run.finish()


if __name__ == "__main__":
    main()
