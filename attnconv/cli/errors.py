"""The one map from library errors to what the command line says and its exit status.

Classes are named by ``module.Class`` so that this map imports nothing (``--help`` stays
free of Lightning); a subclass matches its base's entry.
"""

from __future__ import annotations

import traceback
from pathlib import Path

#: Refusals: bad input the user can fix. One line on stderr, exit status 2.
REFUSED = 2
#: A run that started and had to stop (non-finite loss). One line, exit status 1.
STOPPED = 1

ERRORS: dict[str, tuple[str, int]] = {
    "attnconv.errors.ConfigError": ("error", REFUSED),
    "attnconv.errors.DataError": ("error", REFUSED),
    "attnconv.models.ModelNameError": ("error", REFUSED),
    "attnconv.errors.CheckpointError": ("error", REFUSED),
    "attnconv.pretrained.InitError": ("error", REFUSED),
    "attnconv.export.ExportError": ("failed", REFUSED),
    "builtins.FileNotFoundError": ("error", REFUSED),
    "attnconv.engine.trainer.NonFiniteLossError": ("stopped", STOPPED),
}

_PACKAGE = Path(__file__).resolve().parents[1]


def _raised_by_attnconv(err: BaseException) -> bool:
    """Whether the innermost frame of ``err`` is attnconv's own argument check (not a bug in
    torch or a library below)."""
    frames = traceback.extract_tb(err.__traceback__)
    return bool(frames) and Path(frames[-1].filename).resolve().is_relative_to(_PACKAGE)


def classify(err: BaseException) -> tuple[str, int] | None:
    """(word, exit status) for an error the command line reports in one line, else None."""
    for cls in type(err).__mro__:
        entry = ERRORS.get(f"{cls.__module__}.{cls.__qualname__}")
        if entry:
            return entry
    # The library's own validation (ValueError / TypeError naming the argument) is a refusal.
    if isinstance(err, ValueError | TypeError) and _raised_by_attnconv(err):
        return ("error", REFUSED)
    return None


def one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__
