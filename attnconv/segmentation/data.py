"""Semantic-segmentation data: (image, class-id mask) pairs, joint transforms, padding collate.

- ``voc``: Pascal VOC 2012 through torchvision's ``VOCSegmentation`` (``ROOT/VOCdevkit/
  VOC2012/{JPEGImages,SegmentationClass,ImageSets/Segmentation}``), train / val.
- ``voc_aug``: the usual "train_aug" set (10,582 images): VOC 2012 train plus the Semantic
  Boundaries Dataset (Hariharan et al., ICCV 2011) through torchvision's ``SBDataset`` in its
  ``train_noval`` split (SBD without VOC 2012 val), images in both counted once; val is VOC val.
- ``folder``: ``ROOT/images/{train,val}/*`` and ``ROOT/masks/{train,val}/*.png`` with the same
  file stems; masks hold class ids (0 background) and 255 for pixels to ignore.
- ``shapes``: generated rectangles, ellipses and triangles (:mod:`attnconv.detection.synthetic`)
  with their class masks, 4 classes with background; made when missing, for tests and the CPU
  demo. Its numbers say nothing about real images.

Bad data is a :class:`~attnconv.errors.DataError` with one line: a missing root,
an image without a mask, a mask holding a class id the dataset does not have, a mask of another
aspect ratio than its image (one of the same aspect ratio is resized to the image, nearest
neighbour).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import ConcatDataset, Dataset, Subset
from torchvision import tv_tensors
from torchvision.transforms import v2

from attnconv.engine.images import read_rgb
from attnconv.errors import DataError

#: Mask value of pixels that count for nothing (VOC's object borders), as in torchvision.
IGNORE_INDEX = 255
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor")
SHAPES_CLASSES: tuple[str, ...] = ("background", "rectangle", "ellipse", "triangle")


def check_mask(mask: np.ndarray | torch.Tensor, num_classes: int, source: str) -> None:
    """Raise DataError if ``mask`` holds an id outside ``0..num_classes-1`` and 255."""
    values = np.unique(mask.numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask))
    bad = values[(values >= num_classes) & (values != IGNORE_INDEX) | (values < 0)]
    if len(bad):
        raise DataError(f"{source}: mask holds class id {int(bad[0])}, but the dataset has "
                        f"{num_classes} classes (ids 0..{num_classes - 1}, "
                        f"{IGNORE_INDEX} = ignore)")


def fit_mask(mask: torch.Tensor, size: Sequence[int], source: str) -> torch.Tensor:
    """``mask`` at the image size ``size`` (height, width): a mask of another size but the
    same aspect ratio is resized with nearest neighbours, so labels stay on their pixels; one
    of another aspect ratio or with colour channels is a DataError naming ``source``."""
    height, width = size
    if mask.dim() != 2:
        raise DataError(f"{source}: mask has shape {tuple(mask.shape)}; expected one channel "
                        "of class ids (a grayscale or palette PNG)")
    mask_h, mask_w = mask.shape
    if (mask_h, mask_w) == (height, width):
        return mask
    # The same aspect ratio up to the rounding of a downscaled side.
    if abs(mask_h * width - mask_w * height) > max(width, height):
        raise DataError(f"{source}: mask is {mask_w}x{mask_h} but its image is {width}x{height} "
                        "(another aspect ratio); masks must cover their image")
    return tv_tensors.Mask(v2.functional.resize(mask[None], [height, width],
                                                interpolation=v2.InterpolationMode.NEAREST)[0])


class SegmentationPairs(Dataset):
    """(image, mask) pairs from any dataset of (PIL image, PIL mask), with every mask checked
    against ``num_classes`` and a joint ``transforms`` of (tv_tensors.Image, tv_tensors.Mask)."""

    def __init__(self, base: Dataset, num_classes: int, transforms: Callable | None = None,
                 name: str = "dataset") -> None:
        self.base, self.num_classes, self.transforms, self.name = (base, num_classes,
                                                                   transforms, name)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.base[index]
        mask = np.asarray(mask)
        files = getattr(self.base, "masks", None)  # MaskFolder's and VOCSegmentation's paths
        source = str(files[index]) if files is not None else f"{self.name}[{index}]"
        check_mask(mask, self.num_classes, source)
        image = tv_tensors.Image(v2.functional.pil_to_tensor(image.convert("RGB")))
        mask = tv_tensors.Mask(torch.from_numpy(mask.astype(np.int64)))
        mask = fit_mask(mask, image.shape[-2:], source)
        if self.transforms is not None:
            image, mask = self.transforms(image, mask)
        return image, mask


class MaskFolder(Dataset):
    """Images of ``images`` paired by file stem with the PNG masks of ``masks``; an image
    without a mask is a DataError when the dataset is built."""

    def __init__(self, images: str | Path, masks: str | Path) -> None:
        images, masks = Path(images), Path(masks)
        for folder in (images, masks):
            if not folder.is_dir():
                raise DataError(f"{folder} does not exist (expected image and mask folders "
                                "with the same file stems)")
        self.images = sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.images:
            raise DataError(f"no images in {images}")
        by_stem = {p.stem: p for p in masks.iterdir() if p.suffix.lower() == ".png"}
        missing = [p for p in self.images if p.stem not in by_stem]
        if missing:
            raise DataError(f"{missing[0]} has no mask {masks / (missing[0].stem + '.png')} "
                            f"({len(missing)} of {len(self.images)} images lack one)")
        self.masks = [by_stem[p.stem] for p in self.images]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Image.Image, Image.Image]:
        return read_rgb(self.images[index]), _read_mask(self.masks[index])


def _read_mask(path: Path) -> Image.Image:
    """The mask PNG ``path`` decoded (its mode kept); DataError naming the file when it cannot
    be decoded (truncated, not an image)."""
    try:
        with Image.open(path) as mask:
            mask.load()
            return mask.copy()
    except Exception as err:  # PIL's decoding errors (as read_rgb catches them)
        raise DataError(f"cannot read mask {path}: {type(err).__name__}: {err}") from err


def _check_labelled(pairs: Dataset, name: str) -> None:
    """DataError when no mask of ``pairs`` (a dataset of (image, mask) pairs) has a labelled
    pixel: with every pixel ignored (255) the loss is 0 / 0. Stops at the first labelled mask,
    so a usual dataset costs one read."""
    files = getattr(pairs, "masks", None)
    for index in range(len(pairs)):  # type: ignore[arg-type]
        mask = _read_mask(files[index]) if files is not None else pairs[index][1]
        if (np.asarray(mask) != IGNORE_INDEX).any():
            return
    raise DataError(f"every mask of the {name} training set is {IGNORE_INDEX} (ignore) "
                    "everywhere: there is no labelled pixel to learn from (masks hold class ids "
                    f"0..N-1, and {IGNORE_INDEX} only where a pixel does not count)")


def voc_segmentation(root: str | Path, image_set: str = "train", year: str = "2012") -> Dataset:
    """torchvision's ``VOCSegmentation`` (no download) with a one-line error for a wrong root."""
    from torchvision.datasets import VOCSegmentation

    root = Path(root)
    try:
        return VOCSegmentation(str(root), year=year, image_set=image_set, download=False)
    except (RuntimeError, FileNotFoundError, ValueError) as err:
        raise DataError(f"no VOC{year} segmentation data under {root}: expected "
                        f"{root}/VOCdevkit/VOC{year}/JPEGImages, SegmentationClass and "
                        f"ImageSets/Segmentation/{image_set}.txt ({str(err).splitlines()[0]})"
                        ) from None


def sbd_segmentation(root: str | Path, image_set: str = "train_noval") -> Dataset:
    """torchvision's ``SBDataset`` in segmentation mode (no download), one-line errors."""
    from torchvision.datasets import SBDataset

    root = Path(root)
    try:
        return SBDataset(str(root), image_set=image_set, mode="segmentation", download=False)
    except (RuntimeError, FileNotFoundError, ValueError) as err:
        raise DataError(f"no SBD data under {root}: expected {root}/img, {root}/cls and "
                        f"{root}/{image_set}.txt ({str(err).splitlines()[0]})") from None


def voc_train_aug(voc_root: str | Path, sbd_root: str | Path) -> Dataset:
    """VOC 2012 train + SBD ``train_noval``, each image once (the 10,582-image train_aug)."""
    voc = voc_segmentation(voc_root, "train")
    sbd = sbd_segmentation(sbd_root, "train_noval")
    seen = {Path(p).stem for p in voc.images}
    extra = [i for i, p in enumerate(sbd.images) if Path(p).stem not in seen]
    return ConcatDataset([voc, Subset(sbd, extra)])


def train_transforms(crop_size: int, base_size: int, scale: Sequence[float] = (0.5, 2.0)
                     ) -> v2.Transform:
    """torchvision's segmentation reference: random resize of the short side to
    ``scale`` x ``base_size``, random crop (padded with 0 / ignore), horizontal flip."""
    return v2.Compose([
        v2.RandomResize(int(scale[0] * base_size), int(scale[1] * base_size)),
        v2.RandomCrop(crop_size, pad_if_needed=True,
                      fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}),
        v2.RandomHorizontalFlip(),
        v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64,
                    "others": None}, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def eval_transforms(size: int | None = None) -> v2.Transform:
    """Short side resized to ``size`` (masks with nearest neighbours; None: kept), normalised."""
    return v2.Compose([
        *([v2.Resize(size)] if size else []),
        v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64,
                    "others": None}, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def pad_collate(batch: Sequence[tuple[torch.Tensor, torch.Tensor]]
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack images of different sizes: pad right/bottom with 0, masks with ignore. Each mask
    must have its image's size (:func:`fit_mask`)."""
    for i, (image, mask) in enumerate(batch):
        if image.shape[-2:] != mask.shape[-2:]:
            raise ValueError(f"sample {i} of the batch: mask {tuple(mask.shape[-2:])} and image "
                             f"{tuple(image.shape[-2:])} differ in size")
    height = max(image.shape[-2] for image, _ in batch)
    width = max(image.shape[-1] for image, _ in batch)
    images = torch.zeros(len(batch), batch[0][0].shape[0], height, width)
    masks = torch.full((len(batch), height, width), IGNORE_INDEX, dtype=torch.int64)
    for i, (image, mask) in enumerate(batch):
        images[i, :, :image.shape[-2], :image.shape[-1]] = image
        masks[i, :mask.shape[-2], :mask.shape[-1]] = mask
    return images, masks


@dataclass
class SegmentationSets:
    train: Dataset
    val: Dataset
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def shapes_segmentation(root: str | Path, num_train: int = 128, num_val: int = 32,
                        image_size: int = 64, seed: int = 0) -> tuple[Dataset, Dataset]:
    """The generated shapes as (train, val) :class:`MaskFolder` sets, written to ``root`` the
    first time (:func:`attnconv.detection.make_shapes_dataset` with ``masks=True``)."""
    from attnconv.detection.synthetic import make_shapes_dataset

    root = Path(root)
    if not (root / "masks" / "val").is_dir():
        make_shapes_dataset(root, num_train=num_train, num_val=num_val, image_size=image_size,
                            seed=seed, masks=True)
    return (MaskFolder(root / "train", root / "masks" / "train"),
            MaskFolder(root / "val", root / "masks" / "val"))


def build_segmentation_sets(name: str, root: str | Path | None, *, crop_size: int,
                            base_size: int, eval_size: int | None = None,
                            sbd_root: str | Path | None = None,
                            num_classes: int | None = None, shapes: dict | None = None
                            ) -> SegmentationSets:
    """Train and val sets of the dataset ``name`` (see the module docstring), transformed.

    ``num_classes`` is required for ``folder``; ``shapes`` holds :func:`shapes_segmentation`'s
    arguments. Every problem with the data raises DataError here or when a sample is read.
    """
    if name != "shapes" and root is None:
        raise DataError(f"data.root is required for data.name={name}")
    if name == "voc":
        train, val = voc_segmentation(root, "train"), voc_segmentation(root, "val")
        names = VOC_CLASSES
    elif name == "voc_aug":
        if sbd_root is None:
            raise DataError("data.sbd_root is required for data.name=voc_aug (the folder with "
                            "SBD's img/, cls/ and train_noval.txt)")
        train, val = voc_train_aug(root, sbd_root), voc_segmentation(root, "val")
        names = VOC_CLASSES
    elif name == "folder":
        if not num_classes:
            raise DataError("data.num_classes is required for data.name=folder")
        train = MaskFolder(Path(root) / "images" / "train", Path(root) / "masks" / "train")
        val = MaskFolder(Path(root) / "images" / "val", Path(root) / "masks" / "val")
        names = tuple(f"class_{i}" for i in range(num_classes))
    elif name == "shapes":
        train, val = shapes_segmentation(root, **(shapes or {}))
        names = SHAPES_CLASSES
    else:
        raise DataError(f"unknown data.name {name!r}: expected shapes, voc, voc_aug or folder")
    _check_labelled(train, name)
    return SegmentationSets(
        SegmentationPairs(train, len(names), train_transforms(crop_size, base_size), name),
        SegmentationPairs(val, len(names), eval_transforms(eval_size), name), names)


__all__ = ["IGNORE_INDEX", "SHAPES_CLASSES", "VOC_CLASSES", "MaskFolder", "SegmentationPairs",
           "SegmentationSets", "build_segmentation_sets", "check_mask", "eval_transforms",
           "fit_mask", "pad_collate", "sbd_segmentation", "shapes_segmentation", "train_transforms",
           "voc_segmentation", "voc_train_aug"]
