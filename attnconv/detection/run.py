"""``train_det`` and ``eval_det``: the library functions behind ``attnconv train-det`` /
``attnconv eval-det``.

Without data paths the run generates the synthetic shapes dataset into its own folder, so a
fresh clone trains end to end on CPU with no download. Every evaluation prints AP, AP50, AP75,
APs, APm, APl and writes them to ``RUN/coco_metrics.{json,csv}``.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger
from torchvision.ops.misc import FrozenBatchNorm2d

from attnconv.detection.coco_eval import metrics_table, write_metrics
from attnconv.detection.data import coco_dataset, detection_loader
from attnconv.detection.module import Detector, DetOptim
from attnconv.detection.synthetic import make_shapes_dataset
from attnconv.models.detection import fasterrcnn

#: Faster R-CNN settings for the synthetic 128 px shapes: a narrow backbone, small anchors and
#: few RoIs, so that CPU training takes minutes.
SYNTHETIC_MODEL_ARGS: dict[str, Any] = {
    "backbone_args": {"channels": [16, 32, 64, 128], "layers": [1, 1, 1, 1]},
    "fpn_channels": 32,
    "anchor_sizes": [8, 16, 32, 64, 128],
    "min_size": 128,
    "max_size": 128,
    "rpn_batch_size_per_image": 64,
    "rpn_pre_nms_top_n_train": 200,
    "rpn_post_nms_top_n_train": 50,
    "rpn_pre_nms_top_n_test": 200,
    "rpn_post_nms_top_n_test": 50,
    "box_batch_size_per_image": 32,
    "representation_size": 128,
}


@dataclass
class DetData:
    train_images: str | None = None  # None: generate the synthetic shapes into RUN/data
    train_annotations: str | None = None
    val_images: str | None = None
    val_annotations: str | None = None
    num_classes: int | None = None  # with background; None: largest category id + 1
    batch_size: int = 4
    num_workers: int = 0
    synthetic_train: int = 128
    synthetic_val: int = 32
    synthetic_size: int = 128


@dataclass
class DetTrainer:
    max_epochs: int = 6
    max_steps: int = -1
    accelerator: str = "cpu"
    devices: str = "1"
    precision: str = "32-true"
    check_val_every_n_epoch: int = 1
    log_every_n_steps: int = 10
    progress_bar: bool = True


@dataclass
class DetConfig:
    model: str = "resnet18"  # backbone: any attnconv.create_model ResNet name
    model_args: dict = field(default_factory=lambda: dict(SYNTHETIC_MODEL_ARGS))
    seed: int = 0
    out_dir: str = "runs"
    name: str | None = None  # default: fasterrcnn_MODEL-sSEED
    data: DetData = field(default_factory=DetData)
    optim: DetOptim = field(default_factory=lambda: DetOptim(lr=0.02, milestones=[4, 5],
                                                             warmup_iters=50))
    trainer: DetTrainer = field(default_factory=DetTrainer)

    @property
    def run_name(self) -> str:
        return self.name or f"fasterrcnn_{self.model}-s{self.seed}"


_SECTIONS = {"data": DetData, "optim": DetOptim, "trainer": DetTrainer}


def _unknown(key: str, known: list[str]) -> ValueError:
    close = difflib.get_close_matches(key, known, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ValueError(f"unknown detection config key '{key}'{hint} (known: {', '.join(known)})")


def apply_overrides(config: DetConfig, values: Mapping[str, Any]) -> DetConfig:
    """A copy of ``config`` with ``values`` (nested mappings or dotted keys) applied.
    ``model_args`` replaces the default's keys it names; unknown keys raise ValueError."""
    config = dataclasses.replace(config, model_args=dict(config.model_args),
                                 **{s: dataclasses.replace(getattr(config, s)) for s in _SECTIONS})
    top = [f.name for f in dataclasses.fields(DetConfig)]
    for key, value in values.items():
        head, _, sub = key.partition(".")
        if sub:
            value, key = {sub: value}, head
        if key not in top:
            raise _unknown(key, top)
        if key in _SECTIONS:
            section = getattr(config, key)
            names = [f.name for f in dataclasses.fields(section)]
            for name, sub_value in value.items():
                if name not in names:
                    raise _unknown(f"{key}.{name}", [f"{key}.{n}" for n in names])
                setattr(section, name, sub_value)
        elif key == "model_args":
            config.model_args.update(value)
        else:
            setattr(config, key, value)
    return config


def load_det_recipe(path: str | Path, config: DetConfig | None = None) -> DetConfig:
    """A DetConfig from a YAML recipe (``recipes/fasterrcnn_*.yaml``) applied over ``config``."""
    values = yaml.safe_load(Path(path).read_text()) or {}
    return apply_overrides(config or DetConfig(), values)


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
        if None in paths:
            raise ValueError("give all four of data.train_images, data.train_annotations, "
                             "data.val_images, data.val_annotations (or none for synthetic data)")
    train = coco_dataset(paths[0], paths[1], train=True)
    val = coco_dataset(paths[2], paths[3], train=False)
    num_classes = data.num_classes or max(train.coco.getCatIds()) + 1
    return train, val, num_classes


def build_detector(config: DetConfig, num_classes: int) -> torch.nn.Module:
    return fasterrcnn(config.model, num_classes, **config.model_args)


@dataclass
class DetResult:
    model: str
    metrics: dict[str, float]
    run_dir: Path
    checkpoint: Path
    seconds: float


def _trainer(config: DetConfig, run_dir: Path, **kwargs: Any) -> L.Trainer:
    t = config.trainer
    devices: Any = int(t.devices) if str(t.devices).isdigit() else t.devices
    return L.Trainer(default_root_dir=run_dir, accelerator=t.accelerator, devices=devices,
                     precision=t.precision, logger=CSVLogger(run_dir, name="", version=""),
                     enable_checkpointing=False, enable_progress_bar=t.progress_bar,
                     enable_model_summary=False, log_every_n_steps=t.log_every_n_steps,
                     **kwargs)


def _quiet_lightning() -> None:
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")


def train_det(config: DetConfig) -> DetResult:
    """Train Faster R-CNN as ``config`` says, evaluate on the val split with pycocotools, print
    the table and write ``RUN/detector.pt`` (weights + config) and ``RUN/coco_metrics.*``."""
    _quiet_lightning()
    L.seed_everything(config.seed, verbose=False)
    run_dir = Path(config.out_dir) / config.run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    train, val, num_classes = _datasets(config, run_dir)
    model = build_detector(config, num_classes)
    module = Detector(model, config.optim, coco_gt=val.coco)
    t = config.trainer
    trainer = _trainer(config, run_dir, max_epochs=t.max_epochs, max_steps=t.max_steps,
                       check_val_every_n_epoch=t.check_val_every_n_epoch,
                       num_sanity_val_steps=0)
    start = time.perf_counter()
    trainer.fit(module, detection_loader(train, config.data.batch_size, True,
                                         config.data.num_workers, config.seed),
                detection_loader(val, config.data.batch_size, False, config.data.num_workers))
    seconds = time.perf_counter() - start
    # The last validation may have been skipped (max_steps, check_val_every_n_epoch).
    trainer.validate(module, detection_loader(val, config.data.batch_size, False,
                                              config.data.num_workers), verbose=False)
    checkpoint = run_dir / "detector.pt"
    torch.save({"config": _plain(config), "num_classes": num_classes,
                "state_dict": model.state_dict()}, checkpoint)
    return _report(config.model, module.metrics, run_dir, checkpoint, seconds)


def _plain(config: DetConfig) -> dict[str, Any]:
    # Only builtins, so that eval-det reads the file with torch.load(weights_only=True).
    return yaml.safe_load(yaml.safe_dump(dataclasses.asdict(config)))


def _report(model: str, metrics: dict[str, float], run_dir: Path, checkpoint: Path,
            seconds: float) -> DetResult:
    json_path, csv_path = write_metrics(run_dir, metrics, model)
    print(f"\nCOCO box metrics (percent), {run_dir}\n")
    print(metrics_table({model: metrics}))
    print(f"\nwritten: {json_path}, {csv_path}")
    return DetResult(model, metrics, run_dir, checkpoint, seconds)


def eval_det(checkpoint: str | Path, val_images: str | None = None,
             val_annotations: str | None = None, run_dir: str | Path | None = None,
             batch_size: int | None = None, accelerator: str | None = None) -> DetResult:
    """Evaluate ``RUN/detector.pt`` on a COCO split (default: the split it was validated on)."""
    _quiet_lightning()
    checkpoint = Path(checkpoint)
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    config = apply_overrides(DetConfig(), saved["config"])
    run_dir = Path(run_dir) if run_dir else checkpoint.parent
    if val_images is None:
        if config.data.val_images is None:  # the synthetic split generated inside the run
            val_images, val_annotations = (checkpoint.parent / "data" / "val",
                                           checkpoint.parent / "data" / "annotations"
                                           / "instances_val.json")
        else:
            val_images, val_annotations = config.data.val_images, config.data.val_annotations
    if val_annotations is None:
        raise ValueError("val_annotations is required with val_images")
    val = coco_dataset(val_images, val_annotations, train=False)
    # The weights come from the file: no ImageNet backbone to load again, but the same
    # (frozen) BN layers as in training.
    if config.model_args.pop("pretrained_backbone", None) is not None:
        config.model_args.setdefault("norm_layer", FrozenBatchNorm2d)
    model = build_detector(config, saved["num_classes"])
    model.load_state_dict(saved["state_dict"])
    module = Detector(model, config.optim, coco_gt=val.coco)
    if accelerator:
        config.trainer.accelerator = accelerator
    trainer = _trainer(config, run_dir)
    start = time.perf_counter()
    trainer.validate(module, detection_loader(val, batch_size or config.data.batch_size, False),
                     verbose=False)
    return _report(config.model, module.metrics, run_dir, checkpoint,
                   time.perf_counter() - start)
