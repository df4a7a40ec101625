"""``attnconv train-seg`` / ``attnconv eval-seg``: DeepLabV3 / FCN over the zoo's backbones, with
the same ``--config NAME`` and ``--section.key value`` options as ``attnconv train``."""

from __future__ import annotations

import argparse

from attnconv.engine.config import add_config_arguments, config_from_args
from attnconv.segmentation.config import SegmentationConfig


def _train_seg(args: argparse.Namespace) -> None:
    from attnconv.engine.trainer import is_global_zero
    from attnconv.segmentation.run import train

    result = train(config_from_args(args, SegmentationConfig()))
    if not is_global_zero():  # every process of a distributed run gets here; one reports
        return
    print("\n" + result.report())
    print(f"\nrun folder: {result.run_dir}  (best checkpoint: {result.best_checkpoint}; "
          "metrics: seg_metrics.json / seg_metrics.md)")


def _eval_seg(args: argparse.Namespace) -> None:
    from attnconv.segmentation.run import evaluate

    overrides = {"root": args.data_root} if args.data_root else None
    print(evaluate(args.checkpoint, overrides, accelerator=args.accelerator).report())


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``train-seg`` and ``eval-seg``."""
    train = sub.add_parser(
        "train-seg", allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        help="train DeepLabV3 / FCN semantic segmentation over a zoo ResNet",
        description="Semantic segmentation. With no option: DeepLabV3 over a narrow ResNet-18 "
                    "on generated shapes (CPU, minutes).\nExample: attnconv train-seg --config "
                    "deeplabv3_voc_aug --data.root ~/data/voc --data.sbd_root ~/data/SBD")
    add_config_arguments(train, SegmentationConfig())
    train.set_defaults(func=_train_seg)

    evaluate = sub.add_parser("eval-seg", allow_abbrev=False,
                              help="mean IoU, pixel accuracy and per-class IoU of a train-seg "
                                   "checkpoint on its validation set")
    evaluate.add_argument("checkpoint", help="RUN/checkpoints/*.ckpt written by train-seg "
                          "(read with weights_only=True)")
    evaluate.add_argument("--data-root", dest="data_root",
                          help="data folder, when it moved since training (default: the "
                               "stored one)")
    evaluate.add_argument("--accelerator", default="auto", help="cpu, gpu or auto")
    evaluate.set_defaults(func=_eval_seg)
