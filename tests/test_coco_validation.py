"""COCO annotation files: boxes clamped to their image or dropped with one warning, files that
cannot be right stopped with one line, unreadable detection images named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from attnconv.errors import DataError


def _coco(root: Path, boxes: list[list[float]], category_ids: list[int] | None = None,
          categories: list[int] = (1, 2), size: tuple[int, int] = (40, 30)) -> Path:
    """Two images of ``size`` (W, H); box i on image 1 + i % 2."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    for i in (1, 2):
        Image.new("RGB", size, (i * 50, 0, 0)).save(root / "images" / f"{i}.png")
    ids = category_ids or [1] * len(boxes)
    coco = {"images": [{"id": i, "file_name": f"{i}.png", "width": size[0], "height": size[1]}
                       for i in (1, 2)],
            "annotations": [{"id": n + 1, "image_id": 1 + n % 2, "category_id": c, "bbox": b,
                             "area": 10.0, "iscrowd": 0}
                            for n, (b, c) in enumerate(zip(boxes, ids, strict=True))],
            "categories": [{"id": c, "name": f"c{c}"} for c in categories]}
    path = root / "ann.json"
    path.write_text(json.dumps(coco))
    return path


def test_boxes_across_the_border_are_clamped_and_degenerate_ones_dropped_with_one_warning(
        tmp_path: Path) -> None:
    from attnconv.detection.data import AnnotationWarning, coco_dataset

    boxes = [[-0.01, 2, 10, 10],            # crosses the left border by 0.01 px: clamped
             [35, 20, 10, 20],              # crosses right and bottom: clamped to 35..40, 20..30
             [5, 5, 10, 10],                # fine
             [50, 5, 10, 10],               # fully outside
             [3, 3, 0, 5],                  # zero width
             [3, 3, -4, 5],                 # negative width
             [float("nan"), 1, 2, 2],       # not finite (json writes NaN)
             [39.5, 3, 10, 5]]              # 0.5 px wide once clamped
    path = _coco(tmp_path, boxes)
    with pytest.warns(AnnotationWarning) as record:
        dataset = coco_dataset(tmp_path / "images", path, train=False)
    assert len(record) == 1
    assert str(record[0].message) == (
        f"{path}: clamped 2 of 8 boxes to their image, dropped 5 (1 outside the image, "
        "2 zero or negative size, 1 not finite or not 4 numbers, 1 under 1 px after clamping)")
    _, first = dataset[0]
    _, second = dataset[1]
    torch.testing.assert_close(first["boxes"].as_subclass(torch.Tensor),
                               torch.tensor([[0.0, 2, 9.99, 12], [5, 5, 15, 15]]))
    torch.testing.assert_close(second["boxes"].as_subclass(torch.Tensor),
                               torch.tensor([[35.0, 20, 40, 30]]))
    gt = dataset.coco.loadAnns(dataset.coco.getAnnIds())
    assert [a["bbox"] for a in gt] == [[0.0, 2.0, 9.99, 10.0], [35.0, 20.0, 5.0, 10.0],
                                       [5, 5, 10, 10]]


def test_clean_annotations_give_no_warning(tmp_path: Path) -> None:
    import warnings

    from attnconv.detection.data import coco_dataset

    path = _coco(tmp_path, [[0, 0, 40, 30], [1, 1, 5, 5]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(coco_dataset(tmp_path / "images", path, train=True)) == 2


@pytest.mark.parametrize("case, message", [
    ("unknown category", r"1 annotations of .*ann.json use category ids \[99\] that are not "
                         r"among its categories \[1, 2\]"),
    ("no categories", r"ann.json has no categories"),
    ("missing image", r"1 of 2 images of .*ann.json are missing from .*images, "
                      r"e.g. .*images/2.png"),
    ("no annotations", r"ann.json holds no usable box \(0 annotations\): nothing to train on, "
                       r"and COCO metrics cannot be computed"),
    ("all dropped", r"holds no usable box \(1 annotations, all dropped: 1 outside the image\)"),
])
def test_annotation_files_that_cannot_be_right_stop_with_one_line(tmp_path: Path, case: str,
                                                                  message: str) -> None:
    from attnconv.detection.data import AnnotationError, coco_dataset

    boxes = {"all dropped": [[100, 100, 5, 5]], "no annotations": []}.get(case, [[1, 1, 5, 5]])
    path = _coco(tmp_path, boxes, category_ids=[99] if case == "unknown category" else None,
                 categories=[] if case == "no categories" else [1, 2])
    if case == "missing image":
        (tmp_path / "images" / "2.png").unlink()
    with pytest.raises(AnnotationError, match=message) as err:
        coco_dataset(tmp_path / "images", path, train=False)
    assert "\n" not in str(err.value)


def test_detection_images_are_named_when_unreadable(tmp_path: Path) -> None:
    from attnconv.detection.data import coco_dataset

    path = _coco(tmp_path, [[1, 1, 5, 5], [2, 2, 5, 5]])
    (tmp_path / "images" / "2.png").write_bytes(b"\x89PNG broken")
    dataset = coco_dataset(tmp_path / "images", path, train=False)
    with pytest.raises(DataError, match=r"cannot read image .*images/2.png"):
        dataset[1]
    with pytest.raises(DataError, match=r"^1 of 2 images cannot be read: .*images/2.png"):
        coco_dataset(tmp_path / "images", path, train=False, check=True)
