"""Datasets for training and evaluation, behind one LightningDataModule.

- ``digits``: the 1,797 8x8 handwritten digits (UCI optdigits) that scikit-learn ships inside
  its wheel (``sklearn/datasets/data/digits.csv.gz``), so a run needs no download. The
  train/validation split is stratified and fixed (``random_state=0``), whatever the run's seed.
- ``cifar10`` / ``cifar100``: torchvision's datasets; downloaded only with ``download: true``.
- ``mnist`` / ``fashion_mnist`` / ``kmnist``: torchvision's datasets (the test set validates),
  read from torchvision's folder layout (``ROOT/FashionMNIST/raw/``) or from a folder holding the
  four IDX files, compressed or not (Debian's ``dataset-fashion-mnist`` installs them in
  ``/usr/share/datasets/fashion-mnist``); downloaded only with ``download: true``. One channel,
  normalised with each data set's published training-set mean and standard deviation.
- ``imagefolder``: ``ROOT/train/CLASS/*.jpg`` and ``ROOT/val/CLASS/*.jpg`` (ImageNet layout).
  Grayscale images stay one channel, normalised with the mean and standard deviation of (up to
  1,000 of) the training images; colour images are normalised with ImageNet's.

``data.crop`` chooses the geometry (:func:`image_transforms`): ``imagenet`` trains on random
resized crops (8-100% of the area) and validates on the centre of the image resized to
size / 0.875, as ImageNet recipes do; ``cifar`` trains on random crops of the image padded by an
eighth of its side, as small-image recipes do; ``none`` only resizes. With ``cifar`` and ``none``
the validation images have the training geometry, and with ``augment: false`` training sees
exactly what validation sees. ``auto`` is ``cifar`` for images of at most 64 px and ``imagenet``
above.

Missing or empty data is a :class:`DataError` raised by :func:`build_datasets`, before any
model is built. An image file that cannot be decoded is a DataError naming the file, when it is
read during training or, with ``data.check: true``, in :func:`check_images` before training.

The training loader drops the last partial batch, as torchvision's and timm's reference scripts
do: a last batch of one sample would stop BatchNorm ("Expected more than 1 value per channel").
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torchvision import datasets
from torchvision.transforms import v2

from attnconv.classification.config import DataConfig
from attnconv.engine.images import check_images, image_files, read_rgb
from attnconv.errors import DataError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
#: torchvision's dataset class and the training set's pixel mean and std (pixels in 0..1).
MNIST_FAMILY = {"mnist": (datasets.MNIST, 0.1307, 0.3081),
                "fashion_mnist": (datasets.FashionMNIST, 0.2860, 0.3530),
                "kmnist": (datasets.KMNIST, 0.1918, 0.3483)}
NATIVE_SIZE = {"digits": 8, "cifar10": 32, "cifar100": 32, "imagefolder": 224,
               **dict.fromkeys(MNIST_FAMILY, 28)}
CROPS = ("auto", "imagenet", "cifar", "none")
#: The largest image side that ``crop: auto`` treats as a small image.
SMALL_IMAGE = 64
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")
GRAYSCALE_MODES = ("1", "L", "LA", "I", "I;16", "F")


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
    if cfg.crop != "auto" or cfg.channels not in (None, 1):
        raise DataError("data.crop and data.channels do not apply to data.name=digits (one "
                        "channel, shifted by up to 1/8 of the side when augmented)")
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
    if not root.is_dir() and not cfg.download:
        raise DataError(f"data root {root} does not exist (data.name={cfg.name})")
    return root


def crop_policy(crop: str, stored_size: int, size: int) -> str:
    """The crop ``crop`` names; ``auto``: ``cifar`` when the stored images or the model's
    input (``size``) are at most SMALL_IMAGE px, else ``imagenet``."""
    if crop not in CROPS:
        raise DataError(f"unknown data.crop '{crop}' (known: {', '.join(CROPS)})")
    if crop == "auto":
        return "cifar" if min(stored_size, size) <= SMALL_IMAGE else "imagenet"
    return crop


def image_transforms(crop: str, size: int, augment: bool, mean: Sequence[float],
                     std: Sequence[float], flip: bool = True, channels: int | None = None
                     ) -> tuple[v2.Compose, v2.Compose]:
    """(train, validation) transforms of PIL images for the crop policy ``crop`` (not auto;
    see the module docstring) at ``size`` px. ``flip``: horizontal flips keep the label;
    ``channels``: convert to 1 or 3 channels first (None: keep the image's own)."""
    fit = [v2.Resize(size, antialias=True), v2.CenterCrop(size)]
    if crop == "imagenet":
        train = [v2.RandomResizedCrop(size, antialias=True)] if augment else list(fit)
        # The usual evaluation crop: resize to size / 0.875, keep the centre.
        val = [v2.Resize(round(size / 0.875), antialias=True), v2.CenterCrop(size)]
    elif crop in ("cifar", "none"):
        train, val = list(fit), list(fit)
        if augment and crop == "cifar":
            train.append(v2.RandomCrop(size, padding=max(1, size // 8)))
    else:
        raise DataError(f"unknown data.crop '{crop}' (expected one of {', '.join(CROPS[1:])})")
    if augment and flip:
        train.append(v2.RandomHorizontalFlip())
    head = [v2.Grayscale(channels)] if channels else []
    tail = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(head + train + tail), v2.Compose(head + val + tail)


def _stats(mean: Sequence[float], std: Sequence[float], channels: int
           ) -> tuple[list[float], list[float]]:
    """``mean`` / ``std`` for ``channels`` channels (a one-channel value repeated; colour
    values averaged to one)."""
    if len(mean) == channels:
        return list(mean), list(std)
    if channels == 1:
        return [sum(mean) / len(mean)], [sum(std) / len(std)]
    return [mean[0]] * channels, [std[0]] * channels


def _cifar(cfg: DataConfig, size: int) -> Datasets:
    root = _require_root(cfg)
    cls = datasets.CIFAR10 if cfg.name == "cifar10" else datasets.CIFAR100
    channels = cfg.channels or 3
    train_tf, val_tf = image_transforms(crop_policy(cfg.crop, 32, size), size, cfg.augment,
                                        *_stats(CIFAR_MEAN, CIFAR_STD, channels),
                                        channels=cfg.channels)
    try:
        train = cls(str(root), train=True, download=cfg.download, transform=train_tf)
        val = cls(str(root), train=False, download=cfg.download, transform=val_tf)
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
        raise DataError(f"no readable {cfg.name} in {root} ({err}); pass --data.download true "
                        "to fetch it, or point --data.root at the folder holding "
                        f"{cls.base_folder}/") from err
    return Datasets(train, val, len(train.classes), channels, size)


def _has_idx_files(folder: Path) -> bool:
    return all((folder / name).is_file() or (folder / f"{name}.gz").is_file()
               for name in IDX_FILES)


def _idx_folder(root: Path, cls: type[datasets.MNIST]) -> Path | None:
    """The folder under ``root`` holding the four IDX files of ``cls`` (each plain or .gz):
    torchvision's ``ROOT/CLASS/raw`` or ``root`` itself."""
    return next((f for f in (root / cls.__name__ / "raw", root) if _has_idx_files(f)), None)


def read_idx(path: Path) -> torch.Tensor:
    """An IDX file of unsigned bytes (MNIST's format), plain or gzip-compressed."""
    import gzip

    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(data) < 4 or data[:3] != b"\0\0\x08":
        raise DataError(f"{path} is not an IDX file of unsigned bytes (MNIST's format)")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(data[3])]
    count = 1
    for d in dims:
        count *= d
    if len(data) != 4 + 4 * len(dims) + count:
        raise DataError(f"{path} is truncated: {len(data)} bytes for a {dims} array")
    return torch.frombuffer(bytearray(data[4 + 4 * len(dims):]), dtype=torch.uint8).view(dims)


class _IdxFolder:
    """torchvision's MNIST-family dataset over a folder (``root``) of the four IDX files,
    each plain or gzip-compressed; torchvision itself reads uncompressed files in its own
    ``ROOT/CLASS/raw`` layout only."""

    root: str
    train: bool

    @property
    def raw_folder(self) -> str:
        return self.root

    def _check_exists(self) -> bool:
        return _has_idx_files(Path(self.root))

    def _load_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        folder, split = Path(self.root), "train" if self.train else "t10k"

        def file(name: str) -> Path:
            plain = folder / name
            return plain if plain.is_file() else folder / f"{name}.gz"

        data = read_idx(file(f"{split}-images-idx3-ubyte"))
        targets = read_idx(file(f"{split}-labels-idx1-ubyte")).long()
        if data.dim() != 3 or targets.dim() != 1 or len(data) != len(targets):
            raise DataError(f"{folder}: {split} images {list(data.shape)} and labels "
                            f"{list(targets.shape)} do not match")
        return data, targets


class MNISTFiles(_IdxFolder, datasets.MNIST):
    pass


class FashionMNISTFiles(_IdxFolder, datasets.FashionMNIST):
    pass


class KMNISTFiles(_IdxFolder, datasets.KMNIST):
    pass


def _mnist_family(cfg: DataConfig, size: int) -> Datasets:
    root = _require_root(cfg)
    cls, mean, std = MNIST_FAMILY[cfg.name]
    channels = cfg.channels or 1
    # Flipped digits and characters are other symbols; flipped clothes are still clothes.
    train_tf, val_tf = image_transforms(
        crop_policy(cfg.crop, 28, size), size, cfg.augment, *_stats([mean], [std], channels),
        flip=cfg.name == "fashion_mnist", channels=cfg.channels)
    folder = _idx_folder(root, cls)
    if folder is None and cfg.download:
        try:
            cls(str(root), train=True, download=True)
        except RuntimeError as err:  # every mirror failed
            raise DataError(f"cannot download {cfg.name} into {root}: "
                            f"{str(err).splitlines()[0]}") from err
        folder = _idx_folder(root, cls)
    if folder is None:
        raise DataError(f"no {cfg.name} in {root}: expected the four IDX files "
                        f"({', '.join(IDX_FILES)}, each plain or .gz) in {root} or in "
                        f"{root / cls.__name__ / 'raw'}; pass --data.download true to fetch "
                        "them")
    files = {datasets.MNIST: MNISTFiles, datasets.FashionMNIST: FashionMNISTFiles,
             datasets.KMNIST: KMNISTFiles}[cls]
    train = files(str(folder), train=True, transform=train_tf)
    val = files(str(folder), train=False, transform=val_tf)
    return Datasets(train, val, len(cls.classes), channels, size)


def _grayscale_stats(paths: Sequence[str], limit: int = 1000) -> tuple[float, float]:
    """Mean and std of the pixels (0..1) of up to ``limit`` evenly spaced images of ``paths``."""
    import numpy as np

    step = max(1, len(paths) // limit)
    total = total_sq = count = 0.0
    for path in paths[::step][:limit]:
        pixels = np.asarray(read_rgb(path, "L"), dtype=np.float64) / 255
        total, total_sq, count = (total + pixels.sum(), total_sq + (pixels ** 2).sum(),
                                  count + pixels.size)
    mean = total / count
    return float(mean), float(max((total_sq / count - mean ** 2) ** 0.5, 1e-6))


def _imagefolder(cfg: DataConfig, size: int) -> Datasets:
    from PIL import Image

    root = _require_root(cfg)
    splits = {}
    for split in ("train", "val"):
        folder = root / split
        if not folder.is_dir():
            raise DataError(f"{folder} does not exist: data.name=imagefolder expects "
                            f"{root}/train/CLASS/IMAGE and {root}/val/CLASS/IMAGE")
        try:
            splits[split] = datasets.ImageFolder(str(folder), loader=read_rgb)
        except FileNotFoundError as err:  # no class folder, or class folders without images
            raise DataError(f"no images in {folder}: {err}") from err
    if splits["train"].classes != splits["val"].classes:
        raise DataError(f"{root}/train and {root}/val hold different class folders")
    first = splits["train"].samples[0][0]
    try:
        with Image.open(first) as image:  # the header only: mode and size
            gray, stored_size = image.mode in GRAYSCALE_MODES, min(image.size)
    except Exception as err:
        raise DataError(f"cannot read image {first}: {type(err).__name__}: {err}") from err
    channels = cfg.channels or (1 if gray else 3)
    if gray or channels == 1:
        mean, std = _grayscale_stats([p for p, _ in splits["train"].samples])
        stats = _stats([mean], [std], channels)
    else:  # colour photographs: the statistics every pretrained network expects
        stats = (list(IMAGENET_MEAN), list(IMAGENET_STD))
    transforms = image_transforms(crop_policy(cfg.crop, stored_size, size), size, cfg.augment,
                                  *stats)
    mode = "L" if channels == 1 else "RGB"
    for dataset, transform in zip(splits.values(), transforms, strict=True):
        dataset.transform = transform
        dataset.loader = functools.partial(read_rgb, mode=mode)
    return Datasets(splits["train"], splits["val"], len(splits["train"].classes), channels, size)


BUILDERS = {"digits": _digits, "cifar10": _cifar, "cifar100": _cifar,
            **dict.fromkeys(MNIST_FAMILY, _mnist_family), "imagefolder": _imagefolder}


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
        if self.cfg.download and self.cfg.name != "digits":
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
