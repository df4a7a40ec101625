"""Reading and writing checkpoints safely.

Reading goes through :func:`attnconv.weights.safe_load` (weights-only). Writing goes to a
temporary file in the same folder that then replaces the target with ``os.replace``: a kill
leaves the old file or the new one, never half of one. (Lightning's own ``_atomic_save`` only
buffers in memory before writing the target in place.)
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from attnconv.weights import safe_load


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save ``obj`` to ``path`` through a temporary file and os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O with atomic writes and weights-only reads."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any,
                        storage_options: Any | None = None) -> None:
        atomic_save(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Any | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        return safe_load(path, map_location or "cpu")
