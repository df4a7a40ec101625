"""``attnconv train-det`` / ``attnconv eval-det``: Faster R-CNN over the zoo's backbones, with
the same ``--config NAME`` and ``--section.key value`` options as ``attnconv train``."""

from __future__ import annotations

import argparse

from attnconv.cli.training import add_threads_argument, set_threads
from attnconv.detection.config import DetectionConfig
from attnconv.engine.config import add_config_arguments, config_from_args


def _train_det(args: argparse.Namespace) -> None:
    from attnconv.detection.run import train

    set_threads(args)
    train(config_from_args(args, DetectionConfig()))


def _eval_det(args: argparse.Namespace) -> None:
    from attnconv.detection.run import evaluate

    evaluate(args.checkpoint, args.val_images, args.val_annotations, args.run_dir,
             args.batch_size, args.accelerator)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``train-det`` and ``eval-det``."""
    train = sub.add_parser(
        "train-det", allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        help="train Faster R-CNN with an attention ResNet-FPN backbone",
        description="Train Faster R-CNN on COCO-format data (default: a generated synthetic "
                    "shapes dataset in the run folder, CPU) and evaluate it with pycocotools."
                    "\nExample: attnconv train-det --config fasterrcnn_r101_aw_coco_1x "
                    "--init torchvision:resnet101")
    add_config_arguments(train, DetectionConfig())
    add_threads_argument(train)
    train.set_defaults(func=_train_det)

    evaluate = sub.add_parser("eval-det", allow_abbrev=False,
                              help="COCO box AP of a train-det checkpoint")
    evaluate.add_argument("checkpoint", help="RUN/detector.pt (or RUN/checkpoints/*.ckpt) "
                          "written by train-det")
    evaluate.add_argument("--val-images", dest="val_images", help="image folder (default: the "
                          "run's validation split)")
    evaluate.add_argument("--val-annotations", dest="val_annotations", help="COCO json")
    evaluate.add_argument("--run-dir", dest="run_dir", help="where to write coco_metrics.* "
                          "(default: the checkpoint's run folder)")
    evaluate.add_argument("--batch-size", dest="batch_size", type=int)
    evaluate.add_argument("--accelerator", help="cpu, gpu or auto")
    evaluate.set_defaults(func=_eval_det)
