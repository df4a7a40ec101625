"""Attention convs in ultralytics YOLO model YAMLs.

After :func:`register`, a model YAML may say ``RFAConv``, ``RFCBAMConv``, ``RFCAConv`` or
``AWConv`` wherever it says ``Conv``, with Conv's arguments ``[c2, k, s, p, g, d, act]``::

    - [-1, 1, RFAConv, [128, 3, 2]]  # 1-P2/4

Each is ultralytics' Conv block (conv -> BN -> SiLU) whose conv is the attention conv
(RFAConv: Zhang et al., arXiv:2304.03198 -- the paper's YOLO layers are such blocks; AW:
Zhu et al., ICANN 2021, arXiv:2108.08205). :func:`variant_yaml` writes YOLOv8 YAMLs with every
stride-2 3x3 conv after the stem replaced, as the RFAConv paper placed them.

How the channel bookkeeping works: ``ultralytics.nn.tasks.parse_model`` decides each layer's
input and output channels from a set of module classes local to the function, so it cannot be
extended from outside. ``register()`` wraps it: the rows naming these blocks are parsed as
``Conv`` (same signature, so width scaling and ``max_channels`` apply unchanged), then each
built Conv is replaced by the attention block with the same channels, kernel, stride, padding
and activation. The blocks are not ``Conv`` subclasses on purpose: ``model.fuse()`` folds BN
into ``Conv.conv`` by rebuilding it as a plain ``nn.Conv2d``, which would drop the attention.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from ultralytics.nn import tasks
from ultralytics.nn.modules.conv import Conv, autopad
from ultralytics.utils import LOGGER

from attnconv.layers import create_conv

__all__ = ["BLOCKS", "AWConv", "RFAConv", "RFCAConv", "RFCBAMConv", "register", "variant_yaml",
           "variants", "write_yolo_dataset"]


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
        self.conv = create_conv(self.conv_name, c1, c2, k, s, padding=autopad(k, p, d),
                                bias=False, **extra)
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

_original_parse_model: Callable | None = None


def _as_block(conv: Conv, cls: type[AttnConvBlock]) -> AttnConvBlock:
    c = conv.conv
    block = cls(c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0], c.padding[0],
                c.groups, c.dilation[0], act=conv.act)
    return block


def _parse_model(d: dict, ch: int, verbose: bool = True) -> tuple[nn.Sequential, list[int]]:
    """``parse_model`` that also builds the attention blocks of :data:`BLOCKS`."""
    d = copy.deepcopy(d)
    swaps: dict[int, type[AttnConvBlock]] = {}
    for i, row in enumerate(d["backbone"] + d["head"]):
        if row[2] in BLOCKS:
            swaps[i], row[2] = BLOCKS[row[2]], "Conv"
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
    return model, save


def register() -> None:
    """Make the blocks of :data:`BLOCKS` usable by name in ultralytics model YAMLs
    (idempotent). Pickled models refer to this module, so importing it is enough to load them."""
    global _original_parse_model
    if _original_parse_model is None:
        _original_parse_model = tasks.parse_model
        tasks.parse_model = _parse_model
    for name, cls in BLOCKS.items():
        setattr(tasks, name, cls)


# --- shipped YAMLs and a tiny dataset ----------------------------------------------------------

#: variant suffix -> the block that replaces every stride-2 3x3 Conv after the stem.
VARIANT_BLOCKS = {"rfa": "RFAConv", "rfcbam": "RFCBAMConv", "rfca": "RFCAConv", "aw": "AWConv"}


def variants(scale: str = "n") -> list[str]:
    """Names :func:`variant_yaml` accepts at one YOLOv8 scale (``'yolov8n-rfa'``...)."""
    return sorted(f"yolov8{scale}-{suffix}" for suffix in VARIANT_BLOCKS)


def variant_yaml(name: str, directory: str | Path | None = None) -> Path:
    """Write the YOLOv8 variant ``name`` (``'yolov8{n,s,m,l,x}-{rfa,rfcbam,rfca,aw}'``) and
    return its path, e.g. ``YOLO(variant_yaml('yolov8n-rfa'))`` after :func:`register`.

    The YAML is derived at run time from the installed ultralytics' own ``yolov8.yaml``
    (ultralytics is AGPL-3.0; this package ships no copy of it): every stride-2 3x3 ``Conv``
    after the stem becomes the attention block, where the RFAConv paper placed its layers. The
    file is written to ``directory`` (default: a new temporary folder); its name carries the
    scale, which ultralytics reads from it.
    """
    match = re.fullmatch(r"yolov8([nsmlx])-(\w+)", name)
    if match is None or match[2] not in VARIANT_BLOCKS:
        raise ValueError(f"unknown YOLO variant {name!r}: expected one of {variants()} "
                         "(or another scale: s, m, l, x)")
    import ultralytics
    from ultralytics.utils import YAML

    base = YAML.load(Path(ultralytics.__file__).parent / "cfg/models/v8/yolov8.yaml")
    for index, row in enumerate(base["backbone"] + base["head"]):
        if index > 0 and row[2] == "Conv" and list(row[3][1:3]) == [3, 2]:
            row[2] = VARIANT_BLOCKS[match[2]]
    folder = Path(directory) if directory is not None else Path(
        tempfile.mkdtemp(prefix="attnconv-yolo-"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(json.dumps(base, indent=1))  # JSON is YAML
    return path


def write_yolo_dataset(shapes: Any, root: str | Path) -> Path:
    """The synthetic shapes (:func:`attnconv.detection.make_shapes_dataset`) in ultralytics'
    layout (``images/{split}``, ``labels/{split}``, ``data.yaml``); returns the data YAML."""
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
            lines = [f"{a['category_id'] - 1} {(a['bbox'][0] + a['bbox'][2] / 2) / w:.6f} "
                     f"{(a['bbox'][1] + a['bbox'][3] / 2) / h:.6f} {a['bbox'][2] / w:.6f} "
                     f"{a['bbox'][3] / h:.6f}"
                     for a in coco["annotations"] if a["image_id"] == image["id"]]
            label = root / "labels" / split / (Path(image["file_name"]).stem + ".txt")
            label.write_text("\n".join(lines) + "\n")
    data = root / "data.yaml"
    data.write_text(json.dumps({"path": str(root.resolve()), "train": "images/train",
                                "val": "images/val", "names": names}))  # JSON is YAML
    return data
