"""``attnconv train``, ``eval``, ``compare``, ``demo`` and ``recipes``: classification."""

from __future__ import annotations

import argparse
import os
import time

from attnconv.classification.config import ClassificationConfig
from attnconv.engine.config import add_config_arguments, config_from_args

_FORMATTER = argparse.RawDescriptionHelpFormatter


def _thread_count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a thread count >= 1, got {text!r}")
    return int(text)


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """``--threads N``: torch's CPU threads for the whole command (default: torch's)."""
    parser.add_argument("--threads", type=_thread_count, default=None, metavar="N",
                        help="torch CPU threads; on a machine busy with other work 1 can be "
                        f"much faster (default: torch's, here up to {os.cpu_count()})")


def set_threads(args: argparse.Namespace) -> None:
    """Apply ``--threads`` (before anything builds a model)."""
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def _train(args: argparse.Namespace) -> None:
    from attnconv.classification.run import summary_table, train
    from attnconv.engine.trainer import is_global_zero

    set_threads(args)
    result = train(config_from_args(args, ClassificationConfig()))
    if not is_global_zero():  # every process of a distributed run gets here; one reports
        return
    print("\n" + summary_table([result]))
    print(f"\n{result.note()}\nrun folder: {result.run_dir}  (curves: {result.plot}; "
          f"TensorBoard: tensorboard --logdir {result.run_dir})")


def _eval(args: argparse.Namespace) -> None:
    from attnconv.classification.run import evaluate

    overrides = {"root": args.data_root} if args.data_root else None
    m = evaluate(args.checkpoint, overrides, accelerator=args.accelerator)
    print(f"{m['model']}: top-1 {m['top1']:.2f}%  top-5 {m['top5']:.2f}%  loss {m['loss']:.4f}  "
          f"on {m['images']} validation images ({m['img_per_s']:.0f} img/s)")


def _compare(args: argparse.Namespace) -> None:
    from attnconv.classification.run import compare
    from attnconv.engine.trainer import is_global_zero

    set_threads(args)
    result = compare(args.models, args.seeds, config_from_args(args, ClassificationConfig()))
    if not is_global_zero():
        return
    print("\n" + result.table + f"\n\nbar chart: {result.plot}\ntraining speed, the models "
          f"timed side by side: attnconv bench {' '.join(args.models)}")


def _demo(args: argparse.Namespace) -> None:
    import torch

    from attnconv.classification.demo import DEMO_MODELS, demo_config, throughput_report

    set_threads(args)
    cfg = demo_config(out_dir=args.out_dir, progress_bar=args.progress,
                      max_epochs=args.epochs)
    models = list(DEMO_MODELS)
    print(f"Training {', '.join(models)} on the embedded digits "
          f"(scikit-learn, {cfg.data.image_size}x{cfg.data.image_size}), "
          f"{cfg.trainer.max_epochs} epochs, {args.seeds} seeds each, "
          f"{torch.get_num_threads()} CPU thread(s)...", flush=True)
    from attnconv.classification.data import build_datasets
    from attnconv.classification.run import compare  # Lightning: seconds to import, after the line

    start = time.perf_counter()
    result = compare(models, args.seeds, cfg)
    # Runs timed one after another compare badly on a busy machine: time the models together.
    speed = throughput_report(models, cfg, build_datasets(cfg.data))
    print(f"\n{result.table}\n\nΔ: difference in mean top-1 to {models[0]} with a Welch t "
          f"95% interval over seeds.\n\n{speed}\n\nbar chart: {result.plot}\nper-run curves: "
          f"{result.plot.parent}/*/curves.png\ntook {time.perf_counter() - start:.0f} s")


def _recipes(args: argparse.Namespace) -> None:
    import textwrap

    from attnconv.recipes import describe, list_recipes, recipe_path

    for name in list_recipes():
        print(f"attnconv {recipe_command(name)} --config {name}")
        print(textwrap.fill(describe(name), 100, initial_indent="    ",
                            subsequent_indent="    "))
    print(f"\n(in {recipe_path(list_recipes()[0]).parent})")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``train``, ``eval``, ``compare``, ``demo`` and ``recipes``."""
    train = sub.add_parser(
        "train", formatter_class=_FORMATTER, allow_abbrev=False,
        help="train a classifier (Lightning)",
        description="Train a model from the zoo. With no option: resnet18 on the embedded "
        "digits.\nExamples: attnconv train --config demo\n          attnconv train --config "
        "cifar10 --model resnet18_rfa --data.root ~/data\nDistributed: torchrun "
        "--nproc-per-node 4 -m attnconv.cli train --trainer.devices 4 ...")
    add_config_arguments(train, ClassificationConfig())
    add_threads_argument(train)
    train.set_defaults(func=_train)

    ev = sub.add_parser("eval", allow_abbrev=False,
                        help="top-1/top-5 of a checkpoint on its validation set")
    ev.add_argument("--checkpoint", required=True,
                    help="a .ckpt written by `attnconv train` (read with weights_only=True)")
    ev.add_argument("--data-root", default=None,
                    help="data folder, when it moved since training (default: the stored one)")
    ev.add_argument("--accelerator", default="auto", help="cpu, gpu or auto (default: auto)")
    ev.set_defaults(func=_eval)

    cmp = sub.add_parser(
        "compare", formatter_class=_FORMATTER, allow_abbrev=False,
        help="train several models with several seeds; mean ± std and Δ with a 95%% CI",
        description="Train each MODEL with --seeds seeds under one recipe; print mean ± std of "
        "top-1 and the difference to the first model with a Welch t 95% interval, and save a "
        "bar chart. Runs go to OUT_DIR/NAME/MODEL-sSEED (NAME: compare).")
    cmp.add_argument("models", nargs="+", metavar="MODEL", help="model names; the first is the "
                     "reference")
    cmp.add_argument("--seeds", type=int, default=3, help="seeds per model (default: 3)")
    # The models are the positional MODELs: a --model option would be ignored.
    add_config_arguments(cmp, ClassificationConfig(), exclude=("model", "resume"))
    add_threads_argument(cmp)
    cmp.set_defaults(func=_compare)

    demo = sub.add_parser("demo", allow_abbrev=False,
                          help="compare resnet18, resnet18_aw and resnet18_rfa on the "
                          "embedded digits (a few minutes on 2 CPU cores)")
    demo.add_argument("--seeds", type=int, default=2, help="seeds per model (default: 2)")
    demo.add_argument("--epochs", type=int, default=None,
                      help="epochs per run (default: the demo recipe's)")
    add_threads_argument(demo)
    demo.add_argument("--out-dir", default="runs/demo", help="run folder (default: runs/demo)")
    demo.add_argument("--progress", action="store_true",
                      help="per-epoch progress bars (Lightning's) instead of the one bar of "
                      "the whole demo")
    demo.set_defaults(func=_demo)

    recipes = sub.add_parser("recipes", help="list the shipped recipes (--config NAME)")
    recipes.set_defaults(func=_recipes)


def recipe_command(name: str) -> str:
    """The command a recipe is for (``train``, ``train-det`` or ``train-seg``): the one of the
    task its ``task`` key names."""
    from attnconv.detection.config import DetectionConfig
    from attnconv.engine.config import ConfigError, read_recipe
    from attnconv.recipes import recipe_path
    from attnconv.segmentation.config import SegmentationConfig

    configs = (ClassificationConfig, DetectionConfig, SegmentationConfig)
    task = read_recipe(recipe_path(name)).get("task")
    commands = {c.task: c.command for c in configs}
    if task not in commands:
        raise ConfigError(f"recipe {name} must name its task: task: "
                          f"{' | '.join(commands)} (not {task!r})")
    return commands[task]
