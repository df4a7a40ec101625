"""Attention convs in ultralytics YOLO model YAMLs: YOLOv5, YOLOv8, YOLO11 and their -seg heads.

With this package imported, a model YAML may say ``RFAConv``, ``RFCBAMConv``, ``RFCAConv`` or
``AWConv`` wherever it says ``Conv``, with Conv's arguments ``[c2, k, s, p, g, d, act]``::

    - [-1, 1, RFAConv, [128, 3, 2]]  # 1-P2/4

Each is ultralytics' Conv block (conv -> BN -> SiLU) whose conv is the attention conv
(RFAConv: Zhang et al., arXiv:2304.03198 -- the paper's YOLO layers are such blocks; AW:
Zhu et al., ICANN 2021, arXiv:2108.08205). A CSP block may also be named with an attention
block, ``C3k2_RFAConv``, ``C2f_AWConv``, ``C3_RFCAConv``...: ultralytics' block whose every
bottleneck's second 3x3 conv (``Bottleneck.cv2``) is the attention block, as the YOLO11 / YOLOv8
projects that use RFAConv build ``C3k2_RFAConv`` and ``C2f_RFAConv``.

* :mod:`.blocks` -- the block classes and the YAML names (:data:`BLOCKS`, :data:`CSP_BLOCKS`).
* :mod:`.parse` -- :func:`register`, the wrapped ``parse_model`` that builds them.
* :mod:`.configs` -- :func:`variant_yaml`, YAMLs derived from the installed ultralytics' own
  (AGPL-3.0: this package ships no copy), and :func:`complexity` of the variants.
* :mod:`.dataset` -- :func:`write_yolo_dataset`, the synthetic shapes in ultralytics' layout.

Importing the package registers the blocks: a saved model refers to the block classes in here,
so loading it registers them, and ultralytics can rebuild the model from its YAML to fine-tune
it in a new process.
"""

from attnconv.integrations.ultralytics.blocks import (
    BLOCKS,
    CSP_BLOCKS,
    CSP_NAMES,
    AttnConvBlock,
    AWConv,
    RFAConv,
    RFCAConv,
    RFCBAMConv,
)
from attnconv.integrations.ultralytics.configs import (
    FAMILIES,
    VARIANT_BLOCKS,
    base_yaml,
    complexity,
    variant_yaml,
    variants,
)
from attnconv.integrations.ultralytics.dataset import write_yolo_dataset
from attnconv.integrations.ultralytics.parse import register

__all__ = ["BLOCKS", "CSP_BLOCKS", "CSP_NAMES", "FAMILIES", "VARIANT_BLOCKS", "AWConv",
           "AttnConvBlock", "RFAConv", "RFCAConv", "RFCBAMConv", "base_yaml", "complexity",
           "register", "variant_yaml", "variants", "write_yolo_dataset"]

register()
