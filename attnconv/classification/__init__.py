"""Image classification: training and evaluation on Lightning over :mod:`attnconv.engine`,
data, checkpoints and the networks back from them, summaries, multi-seed comparisons and the
demo. ``attnconv train`` / ``eval`` / ``compare`` / ``demo`` call these.

Names are imported on first use, so that ``attnconv --help`` does not load Lightning.
"""

from __future__ import annotations

from attnconv._lazy import lazy_getattr

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

__getattr__ = lazy_getattr(__name__, _HOMES)
