"""Datasets for training and evaluation, behind one LightningDataModule.

- ``digits``: the 1,797 8x8 handwritten digits (UCI optdigits) that scikit-learn ships inside
  its wheel (``sklearn/datasets/data/digits.csv.gz``), so a run needs no download. The
  train/validation split is stratified and fixed (``random_state=0``), whatever the run's seed.
- ``cifar10`` / ``cifar100``: torchvision's datasets; downloaded only with ``download: true``.
- ``imagefolder``: ``ROOT/train/CLASS/*.jpg`` and ``ROOT/val/CLASS/*.jpg`` (ImageNet layout).

Missing or empty data is a :class:`DataError` raised by :func:`build_datasets`, before any
model is built. An image file that cannot be decoded is a DataError naming the file, when it is
read during training or, with ``data.check: true``, in :func:`check_images` before training.

The training loader drops the last partial batch, as torchvision's and timm's reference scripts
do: a last batch of one sample would stop BatchNorm ("Expected more than 1 value per channel").
"""

from __future__ import annotations

from collections.abc import Iterable
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


def read_rgb(path: str | Path):
    """The image file ``path`` as an RGB PIL image; DataError naming the file when it cannot
    be decoded (truncated, not an image)."""
    from PIL import Image

    try:
        with open(path, "rb") as f, Image.open(f) as image:
            return image.convert("RGB")  # convert() decodes the whole file
    except Exception as err:  # PIL's decoding errors, and those of opener plugins (ultralytics
        # patches Image.open to try HEIF support, which raises ImportError without pi_heif)
        raise DataError(f"cannot read image {path}: {type(err).__name__}: {err}") from err


def image_files(dataset: Dataset) -> list[Path]:
    """The image files behind ``dataset`` (ImageFolder-like ``samples``, torchvision's
    CocoDetection), through wrappers; empty for in-memory data (digits, CIFAR)."""
    base = getattr(dataset, "base", getattr(dataset, "_dataset", dataset))
    if base is not dataset:
        return image_files(base)
    if hasattr(dataset, "samples"):
        return [Path(p) for p, _ in dataset.samples]
    if hasattr(dataset, "coco") and hasattr(dataset, "root"):
        return [Path(dataset.root) / dataset.coco.imgs[i]["file_name"] for i in dataset.ids]
    return []


def check_images(paths: Iterable[str | Path], progress: bool = True) -> int:
    """Open and decode every image in ``paths`` once; DataError listing the files that cannot
    be read (all of them, so one pass finds every bad file). Returns the number checked."""
    from tqdm.auto import tqdm

    paths = list(paths)
    bad = []
    for path in tqdm(paths, desc="checking images", unit="img", disable=not progress or None,
                     leave=False):
        try:
            read_rgb(path)
        except DataError as err:
            bad.append(f"{path} ({err.__cause__})")
    if bad:
        shown = "; ".join(bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise DataError(f"{len(bad)} of {len(paths)} images cannot be read: {shown}")
    return len(paths)


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
            splits[split] = datasets.ImageFolder(str(folder), transform=v2.Compose(tf + normalize),
                                                 loader=read_rgb)
        except FileNotFoundError as err:  # no class folder, or class folders without images
            raise DataError(f"no images in {folder}: {err}") from err
    if splits["train"].classes != splits["val"].classes:
        raise DataError(f"{root}/train and {root}/val hold different class folders")
    return Datasets(splits["train"], splits["val"], len(splits["train"].classes), 3, size)


BUILDERS = {"digits": _digits, "cifar10": _cifar, "cifar100": _cifar,
            "imagefolder": _imagefolder}


def build_datasets(cfg: DataConfig) -> Datasets:
    """Train and validation sets of ``cfg``; DataError when the data is missing or empty, or
    (``cfg.check``) when an image cannot be read."""
    if cfg.name not in BUILDERS:
        raise DataError(f"unknown data.name '{cfg.name}' (known: {', '.join(BUILDERS)})")
    sets = BUILDERS[cfg.name](cfg, cfg.image_size or NATIVE_SIZE[cfg.name])
    if cfg.check:
        check_images(image_files(sets.train) + image_files(sets.val))
    return sets


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

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        # Training drops its last partial batch (a batch of one breaks BatchNorm); validation
        # keeps every sample.
        return DataLoader(dataset, batch_size=self.cfg.batch_size, shuffle=train,
                          num_workers=self.cfg.num_workers, drop_last=train,
                          persistent_workers=self.cfg.num_workers > 0,
                          pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        assert self.sets is not None
        loader = self._loader(self.sets.train, train=True)
        if len(loader) == 0:
            raise DataError(f"data.batch_size {self.cfg.batch_size} is larger than the training "
                            f"set ({len(self.sets.train)} samples on this device): the last "  # type: ignore[arg-type]
                            "partial batch is dropped, so no batch would be left")
        return loader

    def val_dataloader(self) -> DataLoader:
        assert self.sets is not None
        return self._loader(self.sets.val, train=False)
