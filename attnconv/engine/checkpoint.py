"""Lightning's checkpoint I/O through :mod:`attnconv.weights`: atomic writes with a digest of the
tensors, weights-only reads that verify it.

(Lightning's own ``_atomic_save`` only buffers in memory before writing the target in place.)
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.plugins.io import TorchCheckpointIO

from attnconv.weights import atomic_save, safe_load


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O with atomic, digested writes and verified weights-only reads."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any,
                        storage_options: Any | None = None) -> None:
        atomic_save(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Any | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        return safe_load(path, map_location or "cpu")
