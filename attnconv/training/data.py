"""Datasets for training and evaluation, behind one LightningDataModule.

- ``digits``: the 1,797 8x8 handwritten digits (UCI optdigits) that scikit-learn ships inside
  its wheel (``sklearn/datasets/data/digits.csv.gz``), so a run needs no download. The
  train/validation split is stratified and fixed (``random_state=0``), whatever the run's seed.
- ``cifar10`` / ``cifar100``: torchvision's datasets; downloaded only with ``download: true``.
- ``imagefolder``: ``ROOT/train/CLASS/*.jpg`` and ``ROOT/val/CLASS/*.jpg`` (ImageNet layout).

Missing or empty data is a :class:`DataError` raised by :func:`build_datasets`, before any
model is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torchvision import datasets
from torchvision.transforms import v2

from attnconv.training.config import DataConfig

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
NATIVE_SIZE = {"digits": 8, "cifar10": 32, "cifar100": 32, "imagefolder": 224}


class DataError(ValueError):
    """Data that is missing, empty or unreadable, found before training starts."""


@dataclass
class Datasets:
    train: Dataset
    val: Dataset
    num_classes: int
    in_chans: int
    image_size: int


class _Transformed(Dataset):
    """A (image, label) dataset with a per-sample transform of the image."""

    def __init__(self, base: Dataset, transform: v2.Transform) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.base[index]
        return self.transform(image), int(label)


def _digits(cfg: DataConfig, size: int) -> Datasets:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.from_numpy(digits.images).float().div_(16.0).unsqueeze(1)
    labels = torch.from_numpy(digits.target).long()
    train_idx, val_idx = train_test_split(range(len(labels)), test_size=cfg.val_fraction,
                                          stratify=digits.target, random_state=0)
    if size != images.shape[-1]:
        # Resized once here rather than per sample: the per-sample work is only the shift.
        images = v2.functional.resize(images, [size, size], antialias=True)
    mean, std = images[train_idx].mean().item(), images[train_idx].std().item()
    images = (images - mean) / std
    train = TensorDataset(images[train_idx], labels[train_idx])
    val = TensorDataset(images[val_idx], labels[val_idx])
    if cfg.augment:
        # Flips would turn digits into other symbols; a shift of up to 1/8 of the side is safe.
        train = _Transformed(train, v2.RandomAffine(degrees=0, translate=(0.125, 0.125)))
    return Datasets(train, val, 10, 1, size)


def _require_root(cfg: DataConfig) -> Path:
    if not cfg.root:
        raise DataError(f"data.root is required for data.name={cfg.name}: "
                        "pass --data.root FOLDER")
    root = Path(cfg.root).expanduser()
    if not root.is_dir() and not (cfg.download and cfg.name.startswith("cifar")):
        raise DataError(f"data root {root} does not exist (data.name={cfg.name})")
    return root


def _cifar(cfg: DataConfig, size: int) -> Datasets:
    root = _require_root(cfg)
    cls = datasets.CIFAR10 if cfg.name == "cifar10" else datasets.CIFAR100
    normalize = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                 v2.Normalize(CIFAR_MEAN, CIFAR_STD)]
    resize = [v2.Resize(size, antialias=True)] if size != 32 else []
    augment = [v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()] if cfg.augment else []
    try:
        train = cls(str(root), train=True, download=cfg.download,
                    transform=v2.Compose(augment + resize + normalize))
        val = cls(str(root), train=False, download=cfg.download,
                  transform=v2.Compose(resize + normalize))
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
        raise DataError(f"no readable {cfg.name} in {root} ({err}); pass --data.download true "
                        "to fetch it, or point --data.root at the folder holding "
                        f"{cls.base_folder}/") from err
    return Datasets(train, val, len(train.classes), 3, size)


def _imagefolder(cfg: DataConfig, size: int) -> Datasets:
    root = _require_root(cfg)
    normalize = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                 v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if cfg.augment:
        train_tf = [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
    else:
        train_tf = [v2.Resize(size, antialias=True), v2.CenterCrop(size)]
    # The usual evaluation crop: resize to size / 0.875, keep the centre.
    val_tf = [v2.Resize(round(size / 0.875), antialias=True), v2.CenterCrop(size)]
    splits = {}
    for split, tf in (("train", train_tf), ("val", val_tf)):
        folder = root / split
        if not folder.is_dir():
            raise DataError(f"{folder} does not exist: data.name=imagefolder expects "
                            f"{root}/train/CLASS/IMAGE and {root}/val/CLASS/IMAGE")
        try:
            splits[split] = datasets.ImageFolder(str(folder), transform=v2.Compose(tf + normalize))
        except FileNotFoundError as err:  # no class folder, or class folders without images
            raise DataError(f"no images in {folder}: {err}") from err
    if splits["train"].classes != splits["val"].classes:
        raise DataError(f"{root}/train and {root}/val hold different class folders")
    return Datasets(splits["train"], splits["val"], len(splits["train"].classes), 3, size)


BUILDERS = {"digits": _digits, "cifar10": _cifar, "cifar100": _cifar,
            "imagefolder": _imagefolder}


def build_datasets(cfg: DataConfig) -> Datasets:
    """Train and validation sets of ``cfg``; DataError when the data is missing or empty."""
    if cfg.name not in BUILDERS:
        raise DataError(f"unknown data.name '{cfg.name}' (known: {', '.join(BUILDERS)})")
    return BUILDERS[cfg.name](cfg, cfg.image_size or NATIVE_SIZE[cfg.name])


class ClassificationData(L.LightningDataModule):
    """Loaders over :func:`build_datasets`; Lightning adds a DistributedSampler under DDP."""

    def __init__(self, cfg: DataConfig, sets: Datasets | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.sets = sets

    def prepare_data(self) -> None:
        if self.cfg.download and self.cfg.name.startswith("cifar"):
            build_datasets(self.cfg)  # downloads once, on the first process of each node

    def setup(self, stage: str | None = None) -> None:
        if self.sets is None:
            self.sets = build_datasets(self.cfg)

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=self.cfg.batch_size, shuffle=shuffle,
                          num_workers=self.cfg.num_workers, drop_last=False,
                          persistent_workers=self.cfg.num_workers > 0,
                          pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        assert self.sets is not None
        return self._loader(self.sets.train, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        assert self.sets is not None
        return self._loader(self.sets.val, shuffle=False)
