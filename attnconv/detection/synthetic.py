"""A generated detection dataset in COCO format: rectangles, ellipses and triangles on noisy,
textured backgrounds. It is SYNTHETIC (it says so in its ``info``), made so that the detection
pipeline runs end to end without downloads; its numbers say nothing about COCO.

Deterministic: the same seed and arguments give byte-identical images and annotations.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CATEGORIES: tuple[str, ...] = ("rectangle", "ellipse", "triangle")


@dataclass(frozen=True)
class CocoSplit:
    """One split on disk: the image folder and its COCO annotation file."""

    images: Path
    annotations: Path


@dataclass(frozen=True)
class ShapesDataset:
    root: Path
    train: CocoSplit
    val: CocoSplit
    num_classes: int  # with background: COCO category ids 1..3, label 0 is background


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    # A smooth colour gradient, stripes of random frequency and pixel noise, so a detector
    # cannot find shapes by thresholding a flat background.
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = rng.uniform(40, 200, 3)
    slope = rng.uniform(-60, 60, (2, 3))
    img = base + xx[..., None] * slope[0] + yy[..., None] * slope[1]
    angle, freq = rng.uniform(0, np.pi), rng.uniform(4, 16)
    stripes = np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)))
    img += stripes[..., None] * rng.uniform(5, 25)
    img += rng.normal(0, rng.uniform(5, 20), img.shape)
    return img


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, box: tuple[int, int, int, int],
                rng: np.random.Generator, fill: int | tuple[int, ...]) -> None:
    x0, y0, x1, y1 = box
    if kind == "rectangle":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif kind == "ellipse":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
    else:
        # Apex somewhere on the top edge, base on the bottom edge: the box stays tight.
        apex = x0 + int(rng.integers(0, x1 - x0))
        draw.polygon([(apex, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=fill)


def _boxes_overlap(a: tuple[int, ...], b: tuple[int, ...], gap: int = 2) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1]
                or b[3] + gap <= a[1])


def _write_split(folder: Path, ann_file: Path, count: int, image_size: int, max_objects: int,
                 rng: np.random.Generator, split: str, mask_folder: Path | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    min_side, max_side = max(6, image_size // 10), max(12, image_size // 2)
    for image_id in range(1, count + 1):
        canvas = _background(rng, image_size)
        label = np.zeros((image_size, image_size), np.uint8)  # class ids, 0 = background
        boxes: list[tuple[int, int, int, int]] = []
        for _ in range(int(rng.integers(1, max_objects + 1))):
            for _attempt in range(20):  # rejection sampling keeps shapes apart: no occlusion
                w, h = (int(v) for v in rng.integers(min_side, max_side + 1, 2))
                x0 = int(rng.integers(0, image_size - w + 1))
                y0 = int(rng.integers(0, image_size - h + 1))
                box = (x0, y0, x0 + w, y0 + h)
                if not any(_boxes_overlap(box, other) for other in boxes):
                    break
            else:
                continue
            boxes.append(box)
            category = int(rng.integers(0, len(CATEGORIES)))
            mask_img = Image.new("L", (image_size, image_size), 0)
            _draw_shape(ImageDraw.Draw(mask_img), CATEGORIES[category], box, rng, 255)
            mask = np.asarray(mask_img) > 0
            # A colour far from the local background, with its own noise texture.
            colour = (canvas[mask].mean(0) + rng.choice([-1, 1], 3) * rng.uniform(50, 100, 3))
            canvas[mask] = colour + rng.normal(0, 8, (int(mask.sum()), 3))
            label[mask] = category + 1
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": category + 1,
                "bbox": [x0, y0, w, h], "area": int(mask.sum()), "iscrowd": 0,
            })
        name = f"{split}_{image_id:05d}.png"
        Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8)).save(folder / name)
        if mask_folder is not None:  # semantic masks draw no random numbers: images unchanged
            mask_folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(label).save(mask_folder / name)
        images.append({"id": image_id, "file_name": name, "width": image_size,
                       "height": image_size})
    coco = {
        "info": {"description": "attnconv synthetic shapes (generated, not real images)",
                 "version": "1"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n, "supercategory": "shape"}
                       for i, n in enumerate(CATEGORIES)],
    }
    ann_file.parent.mkdir(parents=True, exist_ok=True)
    ann_file.write_text(json.dumps(coco))


def make_shapes_dataset(
    root: str | Path,
    num_train: int = 128,
    num_val: int = 32,
    image_size: int = 128,
    max_objects: int = 3,
    seed: int = 0,
    masks: bool = False,
) -> ShapesDataset:
    """Write the synthetic shapes dataset under ``root`` (``train/``, ``val/``,
    ``annotations/instances_{train,val}.json``) and return where it lies. ``masks``: also
    write each image's class-id mask (0 background, COCO category ids) to
    ``masks/{train,val}/`` under the image's name."""
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32, got {image_size}")
    root = Path(root)
    # Independent streams per split: changing num_train leaves the val split as it was.
    train_rng, val_rng = (np.random.default_rng([seed, i]) for i in range(2))
    splits = {}
    for split, count, rng in (("train", num_train, train_rng), ("val", num_val, val_rng)):
        ann = root / "annotations" / f"instances_{split}.json"
        _write_split(root / split, ann, count, image_size, max_objects, rng, split,
                     root / "masks" / split if masks else None)
        splits[split] = CocoSplit(root / split, ann)
    return ShapesDataset(root, splits["train"], splits["val"], len(CATEGORIES) + 1)
