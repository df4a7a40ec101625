"""Training and evaluation of image classifiers on Lightning: recipes, data, checkpoints,
summaries and multi-seed comparisons. ``attnconv train`` / ``eval`` / ``compare`` call these.

Names are imported on first use, so that ``attnconv --help`` does not load Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "ConfigError": "config", "RunConfig": "config", "load_recipe": "config",
    "DataError": "data", "build_datasets": "data",
    "ModelNameError": "models", "build_model": "models",
    "Classifier": "module", "NonFiniteLossError": "module",
    "compare": "run", "evaluate": "run", "summary_table": "run", "train": "run",
    "load_model": "run", "load_trained": "run",  # defined in attnconv.classification.loading
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'attnconv.classification' has no attribute '{name}'")
    return getattr(importlib.import_module(f"attnconv.classification.{_HOMES[name]}"), name)
