"""``attnconv train-det`` / ``attnconv eval-det``: argument parsing over
:func:`attnconv.detection.train_det` and :func:`attnconv.detection.eval_det`.

Kept free of heavy imports so that ``attnconv --help`` stays fast.
"""

from __future__ import annotations

import argparse
from typing import Any

import yaml


def _train_det(args: argparse.Namespace) -> None:
    from attnconv.detection.run import DetConfig, apply_overrides, load_det_recipe, train_det

    config = load_det_recipe(args.recipe) if args.recipe else DetConfig()
    overrides: dict[str, Any] = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key] = yaml.safe_load(value)  # numbers, booleans and [lists] as in a recipe
    for key in ("model", "out_dir", "name", "seed"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    train_det(apply_overrides(config, overrides))


def _eval_det(args: argparse.Namespace) -> None:
    from attnconv.detection.run import eval_det

    eval_det(args.checkpoint, args.val_images, args.val_annotations, args.run_dir,
             args.batch_size, args.accelerator)


def add_detection_parsers(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser(
        "train-det", help="train Faster R-CNN with an attention ResNet-FPN backbone",
        description="Train Faster R-CNN on COCO-format data (default: a generated synthetic "
                    "shapes dataset in the run folder, CPU) and evaluate it with pycocotools.")
    train.add_argument("--recipe", help="YAML recipe, e.g. "
                       "recipes/detection/fasterrcnn_r101_aw_coco_1x.yaml")
    train.add_argument("--model", help="backbone name (attnconv.create_model), e.g. resnet50_aw")
    train.add_argument("--out-dir", dest="out_dir", help="folder of run folders (default runs)")
    train.add_argument("--name", help="run folder name")
    train.add_argument("--seed", type=int, help="random seed (default 0)")
    train.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a recipe key, e.g. --set trainer.max_epochs=2 "
                            "--set data.batch_size=8 --set model_args.min_size=96")
    train.set_defaults(func=_train_det)

    evaluate = sub.add_parser("eval-det", help="COCO box AP of a train-det checkpoint")
    evaluate.add_argument("checkpoint", help="RUN/detector.pt written by train-det")
    evaluate.add_argument("--val-images", dest="val_images", help="image folder (default: the "
                          "run's validation split)")
    evaluate.add_argument("--val-annotations", dest="val_annotations", help="COCO json")
    evaluate.add_argument("--run-dir", dest="run_dir", help="where to write coco_metrics.* "
                          "(default: the checkpoint's folder)")
    evaluate.add_argument("--batch-size", dest="batch_size", type=int)
    evaluate.add_argument("--accelerator", help="cpu, gpu or auto")
    evaluate.set_defaults(func=_eval_det)
