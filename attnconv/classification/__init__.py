"""Image classification: training and evaluation on Lightning over :mod:`attnconv.engine`,
data, checkpoints and the networks back from them, summaries, multi-seed comparisons and the
demo. ``attnconv train`` / ``eval`` / ``compare`` / ``demo`` call these.

Names are imported on first use, so that ``attnconv --help`` does not load Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "ClassificationConfig": "config",
    "DataError": "data", "build_datasets": "data",
    "build_model": "models",
    "Classifier": "module",
    "CheckpointError": "loading", "Trained": "loading", "load_model": "loading",
    "load_trained": "loading",
    "compare": "run", "evaluate": "run", "summary_table": "run", "train": "run",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'attnconv.classification' has no attribute '{name}'")
    return getattr(importlib.import_module(f"attnconv.classification.{_HOMES[name]}"), name)
