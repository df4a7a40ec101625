"""Reading the image files of every task's datasets: one decoder, one pre-flight check, and
the one-line :class:`~attnconv.errors.DataError` naming the file that cannot be read."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from torch.utils.data import Dataset

from attnconv.errors import DataError

__all__ = ["check_images", "image_files", "read_rgb"]


def read_rgb(path: str | Path, mode: str = "RGB"):
    """The image file ``path`` as a PIL image in ``mode`` (RGB, or L for one channel);
    DataError naming the file when it cannot be decoded (truncated, not an image)."""
    from PIL import Image

    try:
        with open(path, "rb") as f, Image.open(f) as image:
            return image.convert(mode)  # convert() decodes the whole file
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
