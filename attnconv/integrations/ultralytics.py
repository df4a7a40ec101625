"""Attention convs in ultralytics YOLO model YAMLs: YOLOv5, YOLOv8, YOLO11 and their -seg heads.

With this module imported, a model YAML may say ``RFAConv``, ``RFCBAMConv``, ``RFCAConv`` or
``AWConv`` wherever it says ``Conv``, with Conv's arguments ``[c2, k, s, p, g, d, act]``::

    - [-1, 1, RFAConv, [128, 3, 2]]  # 1-P2/4

Each is ultralytics' Conv block (conv -> BN -> SiLU) whose conv is the attention conv
(RFAConv: Zhang et al., arXiv:2304.03198 -- the paper's YOLO layers are such blocks; AW:
Zhu et al., ICANN 2021, arXiv:2108.08205). A CSP block may also be named with an attention
block, ``C3k2_RFAConv``, ``C2f_AWConv``, ``C3_RFCAConv``...: ultralytics' block whose every
bottleneck's second 3x3 conv (``Bottleneck.cv2``) is the attention block, as the YOLO11 / YOLOv8
projects that use RFAConv build ``C3k2_RFAConv`` and ``C2f_RFAConv``.

:func:`variant_yaml` writes such YAMLs from the installed ultralytics' own (AGPL-3.0: this
package ships no copy): every stride-2 3x3 conv after the stem replaced (the RFAConv paper's
YOLOv5n/s and YOLOv8n placement), or every bottleneck conv of the CSP blocks.

How the channel bookkeeping works: ``ultralytics.nn.tasks.parse_model`` decides each layer's
input and output channels from a set of module classes local to the function, so it cannot be
extended from outside. ``register()`` wraps it: the rows naming these blocks are parsed as
``Conv`` (or as the plain CSP block; same signatures, so width scaling and ``max_channels``
apply unchanged), then each built Conv is replaced by the attention block with the same
channels, kernel, stride, padding and activation. The blocks are not ``Conv`` subclasses on
purpose: ``model.fuse()`` folds BN into ``Conv.conv`` by rebuilding it as a plain
``nn.Conv2d``, which would drop the attention.
"""

from __future__ import annotations

import atexit
import copy
import functools
import inspect
import json
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from torch import nn
from ultralytics.nn import tasks
from ultralytics.nn.modules.conv import Conv, autopad
from ultralytics.utils import LOGGER

from attnconv.layers import create_conv, get_conv

__all__ = ["BLOCKS", "CSP_BLOCKS", "FAMILIES", "AWConv", "RFAConv", "RFCAConv", "RFCBAMConv",
           "base_yaml", "complexity", "register", "variant_yaml", "variants",
           "write_yolo_dataset"]


class AttnConvBlock(nn.Module):
    """ultralytics' ``Conv(c1, c2, k, s, p, g, d, act)`` with ``create_conv(conv_name, ...)``."""

    conv_name: ClassVar[str] = "conv"

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, p: int | None = None,
                 g: int = 1, d: int = 1, act: bool | nn.Module = True) -> None:
        super().__init__()
        # The RFA layers reject dilation and groups they cannot honour; pass them only if set.
        extra: dict[str, Any] = {}
        if g != 1:
            extra["groups"] = g
        if d != 1:
            extra["dilation"] = d
        # Layers whose padding=None means their own k // 2 (the RFA family) get None when the
        # YAML leaves p to autopad: autopad's dilated padding would be refused, not the dilation.
        own_padding = inspect.signature(get_conv(self.conv_name)).parameters["padding"].default
        padding = None if p is None and own_padding is None else autopad(k, p, d)
        self.conv = create_conv(self.conv_name, c1, c2, k, s, padding=padding, bias=False,
                                **extra)
        self.bn = nn.BatchNorm2d(c2)
        self.act = (Conv.default_act if act is True
                    else act if isinstance(act, nn.Module) else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class RFAConv(AttnConvBlock):
    """Conv block with :class:`attnconv.layers.RFAConv2d`."""

    conv_name = "rfa"


class RFCBAMConv(AttnConvBlock):
    """Conv block with :class:`attnconv.layers.RFCBAMConv2d`."""

    conv_name = "rfcbam"


class RFCAConv(AttnConvBlock):
    """Conv block with :class:`attnconv.layers.RFCAConv2d`."""

    conv_name = "rfca"


class AWConv(AttnConvBlock):
    """Conv block with :class:`attnconv.layers.AWConv2d`."""

    conv_name = "aw"


#: YAML name -> block class.
BLOCKS: dict[str, type[AttnConvBlock]] = {
    cls.__name__: cls for cls in (RFAConv, RFCBAMConv, RFCAConv, AWConv)}

#: ultralytics' CSP blocks whose bottlenecks can carry the attention blocks (YOLOv5, v8, 11).
CSP_NAMES: tuple[str, ...] = ("C3", "C2f", "C3k2")

#: YAML name (``'C3k2_RFAConv'``...) -> (ultralytics' CSP block, attention block).
CSP_BLOCKS: dict[str, tuple[str, type[AttnConvBlock]]] = {
    f"{csp}_{name}": (csp, cls) for csp in CSP_NAMES for name, cls in BLOCKS.items()}

_original_parse_model: Callable | None = None


def _as_block(conv: Conv, cls: type[AttnConvBlock]) -> AttnConvBlock:
    c = conv.conv
    return cls(c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0], c.padding[0],
               c.groups, c.dilation[0], act=conv.act)


def _swap_bottleneck_convs(block: nn.Module, cls: type[AttnConvBlock]) -> int:
    """Replace ``cv2`` of every ultralytics ``Bottleneck`` inside ``block``; returns how many."""
    from ultralytics.nn.modules.block import Bottleneck

    bottlenecks = [m for m in block.modules() if isinstance(m, Bottleneck)]
    for bottleneck in bottlenecks:
        bottleneck.cv2 = _as_block(bottleneck.cv2, cls)
    return len(bottlenecks)


def _parse_model(d: dict, ch: int, verbose: bool = True) -> tuple[nn.Sequential, list[int]]:
    """``parse_model`` that also builds the blocks of :data:`BLOCKS` and :data:`CSP_BLOCKS`."""
    d = copy.deepcopy(d)
    swaps: dict[int, type[AttnConvBlock]] = {}
    csp_swaps: dict[int, tuple[str, type[AttnConvBlock]]] = {}
    for i, row in enumerate(d["backbone"] + d["head"]):
        if row[2] in BLOCKS:
            swaps[i], row[2] = BLOCKS[row[2]], "Conv"
        elif row[2] in CSP_BLOCKS:
            csp_swaps[i] = (row[2], CSP_BLOCKS[row[2]][1])
            row[2] = CSP_BLOCKS[row[2]][0]
    model, save = _original_parse_model(d, ch, verbose)
    for i, cls in swaps.items():
        old = model[i]
        new = (nn.Sequential(*(_as_block(m, cls) for m in old)) if isinstance(old, nn.Sequential)
               else _as_block(old, cls))
        new.i, new.f = old.i, old.f
        new.type = f"{cls.__module__}.{cls.__name__}"
        new.np = sum(p.numel() for p in new.parameters())
        model[i] = new
        if verbose:
            LOGGER.info(f"attnconv: layer {i} Conv -> {cls.__name__} ({new.np} params)")
    for i, (name, cls) in csp_swaps.items():
        count = _swap_bottleneck_convs(model[i], cls)
        model[i].type = name
        model[i].np = sum(p.numel() for p in model[i].parameters())
        if verbose:
            LOGGER.info(f"attnconv: layer {i} {name}: {count} bottleneck convs -> "
                        f"{cls.__name__} ({model[i].np} params)")
    return model, save


def register() -> None:
    """Make the blocks of :data:`BLOCKS` and :data:`CSP_BLOCKS` usable by name in ultralytics
    model YAMLs (idempotent). Importing this module registers them: a saved model refers to
    this module, so loading it registers the blocks, and ultralytics can rebuild the model from
    its YAML to fine-tune it in a new process."""
    global _original_parse_model
    if _original_parse_model is None:
        _original_parse_model = tasks.parse_model
        tasks.parse_model = _parse_model
    for name, cls in BLOCKS.items():
        setattr(tasks, name, cls)


register()


# --- variants derived from the installed ultralytics' YAMLs -----------------------------------

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


# --- generated data in ultralytics' layout ------------------------------------------------------

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
