"""YOLO variants with attention blocks, derived from the installed ultralytics' own YAMLs.

ultralytics' YAMLs are AGPL-3.0: this package ships no copy. :func:`variant_yaml` replaces
every stride-2 3x3 conv after the stem (the RFAConv paper's YOLOv5n/s and YOLOv8n placement), or
every bottleneck conv of the CSP blocks, with an attention block of :mod:`.blocks`.
"""

from __future__ import annotations

import atexit
import functools
import json
import re
import shutil
import tempfile
from pathlib import Path

import torch

from attnconv.integrations.ultralytics.parse import register

__all__ = ["FAMILIES", "VARIANT_BLOCKS", "base_yaml", "complexity", "variant_yaml", "variants"]

#: variant suffix -> attention block.
VARIANT_BLOCKS = {"rfa": "RFAConv", "rfcbam": "RFCBAMConv", "rfca": "RFCAConv", "aw": "AWConv"}

#: family -> (its YAML under ultralytics/cfg/models, its -seg YAML or None, its CSP block).
FAMILIES: dict[str, tuple[str, str | None, str]] = {
    "yolov5": ("v5/yolov5.yaml", None, "C3"),
    "yolov8": ("v8/yolov8.yaml", "v8/yolov8-seg.yaml", "C2f"),
    "yolo11": ("11/yolo11.yaml", "11/yolo11-seg.yaml", "C3k2"),
}

_VARIANT = re.compile(r"(yolov5|yolov8|yolo11)([nsmlx])(-seg)?(?:-(c3|c2f|c3k2))?-(\w+)")


def variants(scale: str = "n") -> list[str]:
    """Names :func:`variant_yaml` accepts at one scale (``'yolov8n-rfa'``, ``'yolo11n-c3k2-aw'``,
    ``'yolo11n-seg-rfca'``...)."""
    names = []
    for family, (_, seg, csp) in FAMILIES.items():
        for head in ("", "-seg") if seg else ("",):
            for where in ("", f"-{csp.lower()}"):
                names += [f"{family}{scale}{head}{where}-{suffix}" for suffix in VARIANT_BLOCKS]
    return sorted(names)


def base_yaml(family: str, seg: bool = False) -> dict:
    """The installed ultralytics' own model YAML of ``family`` (``'yolov5'``, ``'yolov8'``,
    ``'yolo11'``), or its ``-seg`` variant, as a dict."""
    import ultralytics
    from ultralytics.utils import YAML

    if family not in FAMILIES or (seg and FAMILIES[family][1] is None):
        heads = [f + s for f, (_, g, _) in FAMILIES.items() for s in (("", "-seg") if g else ("",))]
        raise ValueError(f"unknown YOLO family {family + ('-seg' if seg else '')!r}: expected "
                         f"one of {heads}")
    relative = FAMILIES[family][1] if seg else FAMILIES[family][0]
    return YAML.load(Path(ultralytics.__file__).parent / "cfg/models" / relative)


@functools.cache
def _scratch_folder() -> Path:
    """The one folder of this process for the YAMLs of :func:`variant_yaml`, removed at exit."""
    folder = Path(tempfile.mkdtemp(prefix="attnconv-yolo-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def variant_yaml(name: str, directory: str | Path | None = None) -> Path:
    """Write the YOLO variant ``name`` and return its path, e.g.
    ``YOLO(variant_yaml('yolo11n-c3k2-rfa'))``.

    ``name`` is ``{family}{scale}[-seg][-{csp}]-{conv}``: family ``yolov5``, ``yolov8`` or
    ``yolo11``; scale n, s, m, l, x; ``-seg`` for ultralytics' instance-segmentation head (v8,
    11); conv ``rfa``, ``rfcbam``, ``rfca`` or ``aw``. Without ``-{csp}``, every stride-2 3x3
    ``Conv`` after the stem becomes the attention block (the RFAConv paper's YOLOv5n/s and
    YOLOv8n placement; YOLO11 projects do the same). With the family's CSP block (``-c3``,
    ``-c2f``, ``-c3k2``), every CSP row of backbone and head becomes ``{CSP}_{block}``: the
    second 3x3 conv of each of its bottlenecks is the attention block, the downsampling convs
    stay plain.

    The YAML is derived at run time from the installed ultralytics' own YAML (AGPL-3.0; this
    package ships no copy). The file goes to ``directory`` (default: a temporary folder of this
    process, removed when it exits); its name carries the scale, which ultralytics reads from
    it.
    """
    match = _VARIANT.fullmatch(name)
    family, _, seg, csp, suffix = match.groups() if match else (None,) * 5
    if (match is None or suffix not in VARIANT_BLOCKS or (seg and FAMILIES[family][1] is None)
            or (csp and csp != FAMILIES[family][2].lower())):
        raise ValueError(f"unknown YOLO variant {name!r}: expected one of {variants()} "
                         "(or another scale: s, m, l, x)")
    base = base_yaml(family, seg=bool(seg))
    block = VARIANT_BLOCKS[suffix]
    for index, row in enumerate(base["backbone"] + base["head"]):
        if csp:
            if row[2] == FAMILIES[family][2]:
                row[2] = f"{row[2]}_{block}"
        elif index > 0 and row[2] == "Conv" and list(row[3][1:3]) == [3, 2]:
            row[2] = block
    folder = Path(directory) if directory is not None else _scratch_folder()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(json.dumps(base, indent=1))  # JSON is YAML
    return path


def complexity(names: list[str], imgsz: int = 640) -> list[tuple[str, int, int]]:
    """(name, parameters, multiply-adds at one ``imgsz`` x ``imgsz`` image) of each model:
    a :func:`variant_yaml` name or a plain ultralytics one (``'yolo11n'``, ``'yolov8n-seg'``).
    ultralytics' "GFLOPs" are 2 x these multiply-adds."""
    from ultralytics import YOLO

    from attnconv.analysis.profiling import count_macs, count_params

    register()
    rows = []
    for name in names:
        match = _VARIANT.fullmatch(name)
        plain = match is None or match[5] not in VARIANT_BLOCKS  # 'yolov8n-seg'
        source = f"{name}.yaml" if plain else variant_yaml(name)
        model = YOLO(source).model.eval()
        x = torch.zeros(1, 3, imgsz, imgsz)
        rows.append((name, count_params(model), count_macs(model, x)))
    return rows
