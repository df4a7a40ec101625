"""COCO-format detection data through torchvision: ``CocoDetection`` wrapped for transforms v2.

The annotation file is validated before training (:func:`validate_coco`): boxes that cross the
image border are clamped to it, as torchvision's detection reference does; boxes that cannot be
trained on (outside the image, zero or negative size, not finite, under one pixel) are dropped
with one summary warning giving the counts; what cannot be right (no categories, unknown
category ids, missing image files, no box at all) stops with a one-line
:class:`AnnotationError`.

Resizing is left to the detector (Faster R-CNN's ``min_size`` / ``max_size``), so the
transforms only flip and convert, and predictions come back in the original image coordinates
that COCO evaluation expects.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from pycocotools.coco import COCO
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.datasets import CocoDetection, VisionDataset, wrap_dataset_for_transforms_v2
from torchvision.transforms import v2

from attnconv.engine.images import check_images, read_rgb
from attnconv.errors import DataError

Target = dict[str, Any]


class AnnotationError(DataError):
    """A COCO annotation file that cannot describe a detection dataset."""


class AnnotationWarning(UserWarning):
    """Boxes clamped to their image or dropped while validating an annotation file."""


def detection_transforms(train: bool) -> v2.Compose:
    steps: list[v2.Transform] = [v2.ToImage()]
    if train:
        steps.append(v2.RandomHorizontalFlip(0.5))
    # validate_coco has clamped and cleaned the boxes already; these two only matter when an
    # image's real size differs from the width / height its annotation entry gives.
    steps += [v2.ToDtype(torch.float32, scale=True), v2.ClampBoundingBoxes(),
              v2.SanitizeBoundingBoxes()]
    return v2.Compose(steps)


def _image_size(entry: dict[str, Any], images: Path) -> tuple[float, float]:
    if "width" in entry and "height" in entry:
        return float(entry["width"]), float(entry["height"])
    from PIL import Image

    with Image.open(images / entry["file_name"]) as image:  # reads the header only
        return float(image.width), float(image.height)


def _json_kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(value), "a number")


def _check_layout(dataset: Any, source: str) -> None:
    """AnnotationError unless ``dataset`` is a JSON object whose ``images``, ``annotations``
    and ``categories`` are lists of objects (COCO's layout)."""
    if not isinstance(dataset, dict):
        raise AnnotationError(f"{source} must hold a JSON object with 'images', 'annotations' "
                              f"and 'categories' lists (COCO's layout), not {_json_kind(dataset)}")
    for key in ("images", "annotations", "categories"):
        value = dataset.get(key)
        if value is None:
            continue
        if not isinstance(value, list):
            raise AnnotationError(f"'{key}' of {source} must be a list of objects (COCO's "
                                  f"layout), not {_json_kind(value)}")
        bad = [v for v in value if not isinstance(v, dict)]
        if bad:
            raise AnnotationError(f"'{key}' of {source} must be a list of objects (COCO's "
                                  f"layout); it holds {_json_kind(bad[0])}")


def validate_coco(dataset: dict[str, Any], images: str | Path, source: str = "annotations"
                  ) -> tuple[dict[str, Any], Counter]:
    """A cleaned copy of the COCO ``dataset`` (the parsed JSON) whose images lie in ``images``,
    and the counts of what was changed (``clamped`` and each reason for a drop).

    Boxes are clamped to [0, width] x [0, height] and dropped when they are not finite, have a
    zero or negative size, lie outside the image or are under one pixel wide or high after
    clamping (what ``SanitizeBoundingBoxes`` would drop later, silently). Missing ``area`` /
    ``iscrowd`` get COCO's meaning (box area, 0). AnnotationError, naming ``source``, for no
    categories, unknown category or image ids, missing image files and no box left.
    """
    images = Path(images)
    _check_layout(dataset, source)
    categories = dataset.get("categories") or []
    if not categories:
        raise AnnotationError(f"{source} has no categories: a COCO file lists them as "
                              "'categories': [{'id': 1, 'name': ...}, ...]")
    known_categories = {c["id"] for c in categories}
    entries = {im["id"]: im for im in dataset.get("images") or []}
    if not entries:
        raise AnnotationError(f"{source} lists no images")
    missing = [im["file_name"] for im in entries.values()
               if not os.path.isfile(images / im["file_name"])]
    if missing:
        raise AnnotationError(f"{len(missing)} of {len(entries)} images of {source} are missing "
                              f"from {images}, e.g. {images / missing[0]}")
    raw = dataset.get("annotations") or []
    unknown = Counter(a.get("category_id") for a in raw
                      if a.get("category_id") not in known_categories)
    if unknown:
        raise AnnotationError(f"{sum(unknown.values())} annotations of {source} use category ids "
                              f"{sorted(unknown, key=str)} that are not among its categories "
                              f"{sorted(known_categories)}")
    orphans = {a.get("image_id") for a in raw} - entries.keys()
    if orphans:
        raise AnnotationError(f"annotations of {source} refer to image ids "
                              f"{sorted(orphans, key=str)[:5]} that are not among its images")
    counts: Counter = Counter()
    sizes: dict[Any, tuple[float, float]] = {}
    kept = []
    for ann in raw:
        if ann["image_id"] not in sizes:
            sizes[ann["image_id"]] = _image_size(entries[ann["image_id"]], images)
        width, height = sizes[ann["image_id"]]
        box = ann.get("bbox")
        if not (isinstance(box, list | tuple) and len(box) == 4
                and all(isinstance(v, int | float) and math.isfinite(v) for v in box)):
            counts["not finite or not 4 numbers"] += 1
            continue
        x, y, w, h = (float(v) for v in box)
        if w <= 0 or h <= 0:
            counts["zero or negative size"] += 1
            continue
        x0, y0 = min(max(x, 0.0), width), min(max(y, 0.0), height)
        x1, y1 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
        if x1 <= x0 or y1 <= y0:
            counts["outside the image"] += 1
            continue
        if x1 - x0 < 1 or y1 - y0 < 1:
            counts["under 1 px after clamping"] += 1
            continue
        ann = dict(ann)
        if (x0, y0, x1, y1) != (x, y, x + w, y + h):
            counts["clamped"] += 1
            ann["bbox"] = [x0, y0, x1 - x0, y1 - y0]
        ann.setdefault("area", (x1 - x0) * (y1 - y0))
        ann.setdefault("iscrowd", 0)
        kept.append(ann)
    if not kept:
        raise AnnotationError(f"{source} holds no usable box ({len(raw)} annotations"
                              f"{', all dropped: ' + _reasons(counts) if raw else ''}): "
                              "nothing to train on, and COCO metrics cannot be computed")
    dropped = sum(n for reason, n in counts.items() if reason != "clamped")
    if counts:
        warnings.warn(f"{source}: clamped {counts['clamped']} of {len(raw)} boxes to their image"
                      f", dropped {dropped}" + (f" ({_reasons(counts)})" if dropped else ""),
                      AnnotationWarning, stacklevel=3)
    return {**dataset, "annotations": kept}, counts


def _reasons(counts: Counter) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in counts.items() if reason != "clamped")


def load_coco(images: str | Path, annotations: str | Path) -> COCO:
    """The pycocotools index of ``annotations`` after :func:`validate_coco`."""
    annotations = Path(annotations)
    if not annotations.is_file():
        raise AnnotationError(f"annotation file {annotations} does not exist")
    try:
        dataset = json.loads(annotations.read_text())
    except json.JSONDecodeError as err:
        raise AnnotationError(f"{annotations} is not valid JSON: {err}") from err
    cleaned, _ = validate_coco(dataset, images, str(annotations))
    coco = COCO()
    coco.dataset = cleaned
    with contextlib.redirect_stdout(io.StringIO()):  # "creating index... index created!"
        coco.createIndex()
    return coco


class CheckedCocoDetection(CocoDetection):
    """torchvision's CocoDetection over an already validated index; an unreadable image is a
    DataError naming its file."""

    def __init__(self, root: str | Path, coco: COCO, transforms: Any = None) -> None:
        VisionDataset.__init__(self, root, transforms=transforms)
        self.coco = coco
        self.ids = sorted(coco.imgs)

    def _load_image(self, id: int) -> Any:
        return read_rgb(os.path.join(self.root, self.coco.imgs[id]["file_name"]))


def coco_dataset(images: str | Path, annotations: str | Path, train: bool,
                 check: bool = False) -> Dataset:
    """(image, target) pairs with ``boxes`` (XYXY), ``labels`` (COCO category ids) and
    ``image_id``; ``dataset.coco`` is the validated pycocotools index used for evaluation.
    ``check`` decodes every image once first (DataError naming every unreadable file)."""
    base = CheckedCocoDetection(str(images), load_coco(images, annotations),
                                transforms=_CompleteTarget(detection_transforms(train)))
    if check:
        check_images(Path(images) / base.coco.imgs[i]["file_name"] for i in base.ids)
    return wrap_dataset_for_transforms_v2(base, target_keys=("boxes", "labels", "image_id"))
class _CompleteTarget:
    """Transforms that also give images without annotations empty ``boxes`` / ``labels``
    (torchvision's wrapper returns only ``image_id`` for them)."""

    def __init__(self, transforms: v2.Compose) -> None:
        self.transforms = transforms

    def __call__(self, image: Any, target: Target) -> tuple[torch.Tensor, Target]:
        if "boxes" not in target:
            height, width = v2.functional.get_size(image)
            target = {**target,
                      "boxes": tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY",
                                                        canvas_size=(height, width)),
                      "labels": torch.zeros(0, dtype=torch.int64)}
        return self.transforms(image, target)


def collate(batch: list[tuple[torch.Tensor, Target]]) -> tuple[list[torch.Tensor], list[Target]]:
    """Detection batches are lists: images differ in size and in their number of boxes."""
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)


def detection_loader(dataset: Dataset, batch_size: int, train: bool, num_workers: int = 0,
                     seed: int | None = None) -> DataLoader:
    """Batches of :func:`collate`; the shuffle draws from ``seed``'s own generator, or from
    torch's global one (seeded by the run, restored on resume) without a ``seed``."""
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=train, drop_last=False,
                      num_workers=num_workers, collate_fn=collate, generator=generator,
                      persistent_workers=num_workers > 0)
