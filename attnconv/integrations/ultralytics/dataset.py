"""Generated data in ultralytics' layout: the synthetic shapes as YOLO detection or
segmentation labels."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["write_yolo_dataset"]

def _polygon(mask: np.ndarray) -> np.ndarray:
    """The outer contour of the largest blob of a boolean mask, (n, 2) pixel x, y."""
    import cv2

    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_SIMPLE)
    return max(contours, key=cv2.contourArea).reshape(-1, 2).astype(np.float64)


def write_yolo_dataset(shapes: Any, root: str | Path, segments: bool = False) -> Path:
    """The synthetic shapes (:func:`attnconv.detection.make_shapes_dataset`) in ultralytics'
    layout (``images/{split}``, ``labels/{split}``, ``data.yaml``); returns the data YAML.

    ``segments``: polygon labels for ultralytics' segmentation task (``-seg`` models), traced
    from the masks the generator writes with ``masks=True`` (shapes never overlap, so each
    box holds one object)."""
    root = Path(root)
    names = {}
    for split in ("train", "val"):
        coco = json.loads(getattr(shapes, split).annotations.read_text())
        names = {c["id"] - 1: c["name"] for c in coco["categories"]}
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for image in coco["images"]:
            shutil.copy(getattr(shapes, split).images / image["file_name"],
                        root / "images" / split / image["file_name"])
            w, h = image["width"], image["height"]
            if segments:
                mask_file = shapes.root / "masks" / split / image["file_name"]
                if not mask_file.is_file():
                    raise FileNotFoundError(f"{mask_file}: no mask; make the shapes with "
                                            "make_shapes_dataset(..., masks=True)")
                label_map = np.asarray(Image.open(mask_file))
            lines = []
            for a in (a for a in coco["annotations"] if a["image_id"] == image["id"]):
                x0, y0, bw, bh = a["bbox"]
                if segments:
                    inside = np.zeros_like(label_map, dtype=bool)
                    inside[y0:y0 + bh, x0:x0 + bw] = label_map[y0:y0 + bh, x0:x0 + bw] == \
                        a["category_id"]
                    xy = _polygon(inside) / (w, h)
                    coords = " ".join(f"{v:.6f}" for v in xy.reshape(-1))
                else:
                    coords = (f"{(x0 + bw / 2) / w:.6f} {(y0 + bh / 2) / h:.6f} {bw / w:.6f} "
                              f"{bh / h:.6f}")
                lines.append(f"{a['category_id'] - 1} {coords}")
            label = root / "labels" / split / (Path(image["file_name"]).stem + ".txt")
            label.write_text("\n".join(lines) + "\n")
    data = root / "data.yaml"
    data.write_text(json.dumps({"path": str(root.resolve()), "train": "images/train",
                                "val": "images/val",
                                "names": [names[i] for i in sorted(names)]}))  # JSON is YAML
    return data
