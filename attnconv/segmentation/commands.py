"""Sub-commands ``train-seg`` and ``eval-seg`` of the ``attnconv`` command."""

from __future__ import annotations

import argparse

from attnconv.segmentation.config import add_config_arguments, config_from_args


def _train_seg(args: argparse.Namespace) -> None:
    from attnconv.segmentation.run import train_seg

    result = train_seg(config_from_args(args))
    print("\n" + result.report())
    print(f"\nrun folder: {result.run_dir}  (best checkpoint: {result.best_checkpoint}; "
          "metrics: seg_metrics.json / seg_metrics.md)")


def _eval_seg(args: argparse.Namespace) -> None:
    from attnconv.segmentation.run import eval_seg

    overrides = {"root": args.data_root} if args.data_root else None
    print(eval_seg(args.checkpoint, overrides, accelerator=args.accelerator).report())


def add_segmentation_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``train-seg`` and ``eval-seg`` to the ``attnconv`` parser."""
    train = sub.add_parser(
        "train-seg", formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
        help="train DeepLabV3 / FCN over a zoo ResNet (Lightning)",
        description="Semantic segmentation. With no option: DeepLabV3 over a narrow ResNet-18 on "
        "generated shapes (CPU, about a minute).\nExample: attnconv train-seg --config "
        "recipes/segmentation/deeplabv3_voc_aug.yaml --model resnet50_aw --data.root ~/data "
        "--data.sbd_root ~/data/SBD")
    add_config_arguments(train)
    train.set_defaults(func=_train_seg)

    ev = sub.add_parser("eval-seg", allow_abbrev=False, help="mean IoU, pixel accuracy and "
                        "per-class IoU of a train-seg checkpoint on its validation set")
    ev.add_argument("checkpoint", help="a .ckpt written by `attnconv train-seg` "
                    "(read with weights_only=True)")
    ev.add_argument("--data-root", default=None,
                    help="data folder, when it moved since training (default: the stored one)")
    ev.add_argument("--accelerator", default="auto", help="cpu, gpu or auto (default: auto)")
    ev.set_defaults(func=_eval_seg)
