"""``train_det`` and ``eval_det``: the library functions behind ``attnconv train-det`` /
``attnconv eval-det``.

Without data paths the run generates the synthetic shapes dataset into its own folder, so a
fresh clone trains end to end on CPU with no download. Every evaluation prints AP, AP50, AP75,
APs, APm, APl and writes them to ``RUN/coco_metrics.{json,csv}``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from torchvision.ops.misc import FrozenBatchNorm2d

from attnconv.detection.coco_eval import metrics_table, write_metrics
from attnconv.detection.config import SYNTHETIC_MODEL_ARGS, DetConfig
from attnconv.detection.data import coco_dataset, detection_loader
from attnconv.detection.module import Detector
from attnconv.detection.synthetic import make_shapes_dataset
from attnconv.engine.config import ConfigError, apply, load_recipe, to_dict
from attnconv.engine.progress import JobProgress
from attnconv.engine.trainer import (
    NonFiniteLossError,
    SavedEpoch,
    check_devices,
    claim_run_dir,
    evaluation_trainer,
    is_global_zero,
    make_trainer,
    quiet_lightning,
    result_note,
    resume_notes,
    resume_path,
    run_dir_path,
    saved_epochs,
    stopped_note,
)
from attnconv.errors import CheckpointError
from attnconv.models import check_model_name
from attnconv.models.detection import check_fasterrcnn_args, fasterrcnn
from attnconv.profiling import model_table
from attnconv.weights import atomic_save, safe_load

__all__ = ["SYNTHETIC_MODEL_ARGS", "DetConfig", "DetResult", "build_detector", "eval_det",
           "load_det_recipe", "train_det"]

def load_det_recipe(name_or_path: str | Path, config: DetConfig | None = None) -> DetConfig:
    """A DetConfig from a shipped recipe's name (``fasterrcnn_r101_aw_coco_1x``) or a YAML
    file, applied over ``config`` (defaults when None)."""
    return load_recipe(name_or_path, config or DetConfig())


def check_config(config: DetConfig) -> None:
    """ConfigError for what would fail later: a data section naming only some of the four
    paths, a ``model_args`` key Faster R-CNN does not take, an unknown backbone."""
    check_model_name(config.model)
    data = config.data
    paths = (data.train_images, data.train_annotations, data.val_images, data.val_annotations)
    if any(p is not None for p in paths) and None in paths:
        raise ConfigError("give all four of data.train_images, data.train_annotations, "
                          "data.val_images, data.val_annotations (or none for synthetic data)")
    if "pretrained_backbone" in config.model_args:
        raise ConfigError("model_args.pretrained_backbone: give the backbone's weights as init "
                          "(--init torchvision:resnet50, timm:NAME or a weights file)")
    try:
        check_fasterrcnn_args(config.model_args)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model_args: {err}") from err


def _datasets(config: DetConfig, run_dir: Path):
    data = config.data
    if data.train_images is None:
        shapes = make_shapes_dataset(run_dir / "data", data.synthetic_train, data.synthetic_val,
                                     data.synthetic_size, seed=config.seed)
        paths = (shapes.train.images, shapes.train.annotations, shapes.val.images,
                 shapes.val.annotations)
    else:
        paths = (data.train_images, data.train_annotations, data.val_images,
                 data.val_annotations)
    train = coco_dataset(paths[0], paths[1], train=True)
    val = coco_dataset(paths[2], paths[3], train=False)
    num_classes = data.num_classes or max(train.coco.getCatIds()) + 1
    return train, val, num_classes


def build_detector(config: DetConfig, num_classes: int, load_init: bool = True
                   ) -> torch.nn.Module:
    """The Faster R-CNN ``config`` describes (``config.model`` is the backbone's zoo name), its
    backbone started from ``config.init``; without ``load_init`` the same network (frozen BN)
    without reading those weights, for a checkpoint to fill."""
    check_config(config)
    args = dict(config.model_args)
    if config.init and load_init:
        args["pretrained_backbone"] = config.init
    elif config.init:
        args.setdefault("norm_layer", FrozenBatchNorm2d)
    model = fasterrcnn(config.model, num_classes, **args)
    if config.init and load_init:
        print(f"backbone {model.backbone.load_report}")
    return model


def detector_summary(name: str, model: torch.nn.Module) -> str:
    """The table printed before training (:func:`attnconv.profiling.model_table`), for a
    square image at the side Faster R-CNN resizes it to (``min(min_size, max_size)``)."""
    side = min(max(model.transform.min_size), model.transform.max_size)
    return model_table([(f"fasterrcnn({name})", model)], [torch.zeros(3, side, side)],
                       input_label=f"3x{side}x{side} image")


@dataclass
class DetResult:
    model: str
    metrics: dict[str, float]
    run_dir: Path
    checkpoint: Path
    seconds: float
    #: Which epoch and file the metrics are from (and the best epoch's, when another).
    note: str = ""


def train_det(config: DetConfig, callbacks: Sequence[L.Callback] = ()) -> DetResult:
    """Train Faster R-CNN as ``config`` says, evaluate on the val split with pycocotools, print
    the table and write ``RUN/detector.pt`` (weights + config), ``RUN/coco_metrics.*`` and
    the Lightning checkpoints ``RUN/checkpoints/{best,last}.ckpt`` (for ``resume``)."""
    quiet_lightning()
    check_config(config)
    check_devices(config.trainer)
    run_dir = run_dir_path(config.out_dir, config.run_name)
    resume = resume_path(config.resume, run_dir)
    for note in resume_notes(resume, _plain(config)):
        print(f"resume: applying {note}")
    with claim_run_dir(run_dir, resuming=resume is not None, overwrite=config.overwrite,
                       asked=_plain(config)):
        return _train_det(config, run_dir, resume, callbacks)


def _train_det(config: DetConfig, run_dir: Path, resume: Path | None,
               callbacks: Sequence[L.Callback]) -> DetResult:
    L.seed_everything(config.seed, workers=True, verbose=False)
    train, val, num_classes = _datasets(config, run_dir)
    model = build_detector(config, num_classes, load_init=resume is None)
    meta = {"config": _plain(config), "num_classes": num_classes}
    module = Detector(model, config.optim, coco_gt=val.coco, meta=meta)
    job = JobProgress(f"train-det {config.model}", detail=config.trainer.progress_bar)
    job.write(detector_summary(config.model, model))
    trainer = make_trainer(config.trainer, run_dir, monitor="val/AP", mode="max",
                           callbacks=[job.callback(config.run_name), *callbacks],
                           tensorboard=False, resuming=resume is not None)
    job.bar.refresh()  # the trainer is accepted: the bar shows from here
    data = config.data
    start = time.perf_counter()
    try:
        # The shuffle draws from the global generator, whose state the checkpoints keep
        # (RNGState), so that a resumed run sees the data in the same order.
        trainer.fit(module, detection_loader(train, data.batch_size, True, data.num_workers),
                    detection_loader(val, data.batch_size, False, data.num_workers),
                    ckpt_path=resume)
    except NonFiniteLossError as err:
        raise NonFiniteLossError(f"{err}; {stopped_note(run_dir)}") from None
    finally:
        job.close()
    seconds = time.perf_counter() - start
    # The last validation may have been skipped (max_steps, check_val_every_n_epoch).
    evaluation_trainer(config.trainer.accelerator).validate(
        module, detection_loader(val, data.batch_size, False, data.num_workers), verbose=False)
    checkpoint = run_dir / "detector.pt"
    last, best = saved_epochs(trainer, run_dir, "val/AP")
    if trainer.is_global_zero:
        epoch = {"epoch": last.epoch} if last is not None else {}
        atomic_save({**meta, **epoch, "state_dict": model.state_dict()}, checkpoint)
    if last is not None:  # detector.pt holds the weights of last.ckpt
        last = SavedEpoch(checkpoint, last.epoch, module.metrics.get("AP"))
    return _report(config.model, module.metrics, run_dir, checkpoint, seconds,
                   result_note(last, best, config.trainer.max_epochs, "AP"))


def _plain(config: DetConfig) -> dict[str, Any]:
    # Only builtins, so that eval-det reads the file with torch.load(weights_only=True).
    return yaml.safe_load(yaml.safe_dump(to_dict(config)))


def _report(model: str, metrics: dict[str, float], run_dir: Path, checkpoint: Path,
            seconds: float, note: str) -> DetResult:
    json_path, csv_path = write_metrics(run_dir, metrics, model)
    if is_global_zero():  # every process of a distributed run gets here; one reports
        print(f"\nCOCO box metrics (percent), {run_dir}\n")
        print(metrics_table({model: metrics}))
        print(f"\n{note}\nwritten: {json_path}, {csv_path}")
    return DetResult(model, metrics, run_dir, checkpoint, seconds, note)


def eval_det(checkpoint: str | Path, val_images: str | None = None,
             val_annotations: str | None = None, run_dir: str | Path | None = None,
             batch_size: int | None = None, accelerator: str | None = None) -> DetResult:
    """Evaluate ``RUN/detector.pt`` (or a train-det ``.ckpt``) on a COCO split (default: the
    split it was validated on). Writes ``coco_metrics.*`` only; the training log is untouched."""
    quiet_lightning()
    checkpoint = Path(checkpoint)
    saved = safe_load(checkpoint)
    if isinstance(saved, dict) and "attnconv" in saved:  # a Lightning checkpoint of train-det
        saved = {**saved["attnconv"], "epoch": saved.get("epoch"), "state_dict": {
            k.removeprefix("model."): v for k, v in saved["state_dict"].items()}}
    if not (isinstance(saved, dict) and {"config", "num_classes", "state_dict"} <= set(saved)):
        raise CheckpointError(f"{checkpoint} is not a checkpoint written by `attnconv train-det`")
    if "in_chans" in saved:  # what `attnconv train` stores with a classifier
        raise CheckpointError(f"{checkpoint} is a classification checkpoint of `attnconv train`, "
                              "not of `attnconv train-det`: use attnconv eval --checkpoint")
    config = apply(DetConfig(), saved["config"], where=str(checkpoint))
    home = checkpoint.parent if checkpoint.suffix == ".pt" else checkpoint.parent.parent
    run_dir = Path(run_dir) if run_dir else home
    if val_images is None:
        if config.data.val_images is None:  # the synthetic split generated inside the run
            val_images, val_annotations = (home / "data" / "val",
                                           home / "data" / "annotations" / "instances_val.json")
        else:
            val_images, val_annotations = config.data.val_images, config.data.val_annotations
    if val_annotations is None:
        raise ConfigError("--val-annotations is required with --val-images")
    val = coco_dataset(val_images, val_annotations, train=False)
    # The weights come from the file: no ImageNet backbone to load again, but the same
    # (frozen) BN layers as in training.
    model = build_detector(config, saved["num_classes"], load_init=False)
    model.load_state_dict(saved["state_dict"])
    module = Detector(model, config.optim, coco_gt=val.coco)
    trainer = evaluation_trainer(accelerator or config.trainer.accelerator)
    start = time.perf_counter()
    trainer.validate(module, detection_loader(val, batch_size or config.data.batch_size, False),
                     verbose=False)
    epoch = saved.get("epoch")
    note = f"figures of {checkpoint}" + (
        f" (epoch {epoch + 1}/{config.trainer.max_epochs})" if isinstance(epoch, int) else "")
    return _report(config.model, module.metrics, run_dir, checkpoint,
                   time.perf_counter() - start, note)
