"""COCO box evaluation with pycocotools: AP, AP50, AP75, APs, APm, APl, as a table and as files."""

from __future__ import annotations

import contextlib
import csv
import io
import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from attnconv.engine.tables import markdown_table

#: The first six of COCOeval's twelve summary numbers, in its order.
COCO_METRICS: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def to_coco_detections(image_ids: Iterable[int], outputs: Iterable[Mapping[str, torch.Tensor]]
                       ) -> list[dict]:
    """torchvision detector outputs (XYXY boxes, labels = category ids, scores) as COCO
    result entries (XYWH boxes)."""
    results = []
    for image_id, out in zip(image_ids, outputs, strict=True):
        boxes = out["boxes"].detach().cpu().double()
        boxes[:, 2:] -= boxes[:, :2]
        for box, label, score in zip(boxes.tolist(), out["labels"].tolist(),
                                     out["scores"].tolist(), strict=True):
            results.append({"image_id": int(image_id), "category_id": int(label),
                            "bbox": [round(v, 2) for v in box], "score": round(float(score), 5)})
    return results


def coco_box_metrics(coco_gt: COCO, detections: list[dict]) -> dict[str, float]:
    """COCOeval 'bbox' summary in percent; all zero when there is no detection at all.

    COCOeval reports -1 for an area range without ground truth; those stay -1.
    """
    if not detections:
        return dict.fromkeys(COCO_METRICS, 0.0)
    # pycocotools prints progress and its 12-line summary; the caller prints a table instead.
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(detections)
        evaluator = COCOeval(coco_gt, coco_dt, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: (float(v) * 100 if v >= 0 else -1.0)
            for name, v in zip(COCO_METRICS, evaluator.stats[:6], strict=True)}


#: What the table prints for a metric COCOeval cannot compute (-1: no ground truth in that
#: area range, e.g. APl without large objects).
NOT_COMPUTABLE = "\u2013"  # en dash


def metrics_table(rows: Mapping[str, Mapping[str, float]]) -> str:
    """One markdown row per model: ``{model: metrics}``; -1 prints as :data:`NOT_COMPUTABLE`."""
    return markdown_table(("model", *COCO_METRICS),
                          [(name, *(NOT_COMPUTABLE if float(m[k]) < 0 else float(m[k])
                                    for k in COCO_METRICS))
                           for name, m in rows.items()])


def write_metrics(run_dir: str | Path, metrics: Mapping[str, float], model: str,
                  stem: str = "coco_metrics") -> tuple[Path, Path]:
    """``run_dir/<stem>.json`` and ``.csv`` with the six COCO numbers (percent)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = run_dir / f"{stem}.json", run_dir / f"{stem}.csv"
    json_path.write_text(json.dumps({"model": model, **{k: metrics[k] for k in COCO_METRICS}},
                                    indent=2))
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("model", *COCO_METRICS))
        writer.writerow((model, *(f"{metrics[k]:.2f}" for k in COCO_METRICS)))
    return json_path, csv_path
