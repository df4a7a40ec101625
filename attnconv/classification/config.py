"""Classification run configuration: the sections of ``attnconv train`` over the shared config
system of :mod:`attnconv.engine.config`.

Precedence is defaults < recipe < ``--section.key value`` options. Every key a recipe or an
option names must exist: a typo is an error before any data is read or any model is built.
``model_args`` defaults to nothing (the zoo network as its name says); a recipe states it whole.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from attnconv.engine.config import MAX_IMAGE_SIDE, ConfigError, RunConfig, opt

INIT_HELP = ("start from pretrained weights of the plain network: torchvision:NAME[.WEIGHTS], "
             "timm:NAME, or a weights file (state dict, attnconv checkpoint, official RFAConv "
             "ImageNet checkpoint); attention tensors start neutral, a new class count gets a "
             "new classifier")

__all__ = ["ClassificationConfig", "DataConfig", "OptimConfig", "check_model_args"]


@dataclass
class DataConfig:
    name: str = opt("digits", "dataset: digits (embedded, no download), cifar10, cifar100, "
                               "mnist, fashion_mnist, kmnist, imagefolder "
                               "(ROOT/train/CLASS/*.png and ROOT/val/CLASS/*)")
    root: str | None = opt(None, "dataset folder; required for every dataset but digits (MNIST "
                                  "family: torchvision's layout or a folder of the IDX files)")
    download: bool = opt(False, "download CIFAR or the MNIST family into root when it is not "
                                 "there")
    image_size: int | None = opt(None, "side of the square images fed to the model; None: the "
                                        "dataset's own (digits 8, MNIST family 28, CIFAR 32, "
                                        "imagefolder 224)",
                                  min=8, max=MAX_IMAGE_SIDE)
    crop: str = opt("auto", "geometry of the images: imagenet (random resized crop; validation "
                             "resized to size/0.875 and centre-cropped), cifar (random crop of "
                             "the image padded by 1/8 of its side), none (resize only); cifar "
                             "and none validate on the training geometry; auto: cifar for "
                             "images of at most 64 px, else imagenet",
                     choices=("auto", "imagenet", "cifar", "none"))
    channels: int | None = opt(None, "image channels fed to the model; None: the data's own "
                                      "(1 for grayscale images)", choices=(None, 1, 3))
    batch_size: int = opt(64, "samples per batch on each device", min=1)
    num_workers: int = opt(0, "data-loading worker processes per device", min=0)
    val_fraction: float = opt(0.2, "digits only: share of samples held out for validation",
                               above=0.0, below=1.0)
    augment: bool = opt(True, "training augmentation (data.crop's random crop, flip if the "
                               "data allows; a small random shift for digits)")
    check: bool = opt(False, "open every image file once before training (names every file "
                              "that cannot be read)")


@dataclass
class OptimConfig:
    name: str = opt("sgd", "optimizer: sgd or adamw", choices=("sgd", "adamw"))
    lr: float = opt(0.1, "learning rate for a batch of data.batch_size x devices x nodes",
                     min=0.0)
    momentum: float = opt(0.9, "SGD momentum", min=0.0, max=1.0)
    nesterov: bool = opt(False, "SGD Nesterov momentum")
    weight_decay: float = opt(1e-4, "weight decay", min=0.0)
    scheduler: str = opt("multistep", "lr schedule per epoch: multistep, cosine or constant",
                          choices=("multistep", "cosine", "constant"))
    milestones: list[int] = field(default_factory=lambda: [30, 60, 90], metadata={
        "help": "multistep: epochs at which lr is multiplied by gamma", "min": 0})
    gamma: float = opt(0.1, "multistep: lr factor at each milestone", above=0.0)
    warmup_epochs: int = opt(0, "epochs of linear lr warm-up before the schedule", min=0)
    label_smoothing: float = opt(0.0, "cross-entropy label smoothing", min=0.0, below=1.0)


@dataclass
class ClassificationConfig(RunConfig):
    """The run of ``attnconv train``: the engine's run fields, the data and optim sections,
    and the module's memory format and compilation."""

    task: ClassVar[str] = "classification"
    command: ClassVar[str] = "train"
    resume_applies: ClassVar[frozenset[str]] = frozenset({"data.num_workers", "data.root",
                                                          "data.download"})
    run_files: ClassVar[frozenset[str]] = frozenset({"curves.png"})

    model_args: dict = field(default_factory=dict, metadata={
        "help": "keyword arguments of the model, e.g. '{cifar_stem: true, channels: [16, 32, "
                "64, 128]}' (a recipe states them all; an option changes the keys it names)"})
    init: str | None = opt(None, INIT_HELP)
    channels_last: bool = opt(False, "channels-last memory format (faster on GPUs with AMP)")
    compile: bool = opt(False, "torch.compile the model")
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def check(self) -> None:
        """Also: ``model_args.channels`` / ``layers`` that no ResNet of the zoo has."""
        super().check()
        check_model_args(self.model_args)


def check_model_args(model_args: Mapping[str, Any]) -> None:
    """ConfigError for ``channels`` or ``layers`` that are not four whole numbers >= 1 (every
    zoo network is a ResNet of four stages: one width and one block count per stage)."""
    for key, what in (("channels", "widths"), ("layers", "block counts")):
        value = model_args.get(key)
        if value is None:
            continue
        if not (isinstance(value, list | tuple) and len(value) == 4
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1
                        for v in value)):
            raise ConfigError(f"model_args.{key} must be 4 {what} >= 1, one per ResNet stage, "
                              f"not {value!r}")
