"""The recipes that ship with attnconv, as package data: ``attnconv train --config NAME``.

A recipe is a YAML mapping over a task's config (:mod:`attnconv.training.config` for
classification, :mod:`attnconv.detection.config` for detection) that states the whole model,
so nothing of one recipe leaks into another. Its first comment lines say where it comes from.
"""

from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path

from attnconv.errors import ConfigError


def _folder() -> Path:
    return Path(str(resources.files(__name__)))


def list_recipes() -> list[str]:
    """Names of the shipped recipes."""
    return sorted(p.stem for p in _folder().glob("*.yaml"))


def recipe_path(name_or_path: str | Path) -> Path:
    """The file of a shipped recipe's name, or ``name_or_path`` itself when it is a file.

    An unknown name raises ConfigError with the close names.
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = _folder() / f"{path.name.removesuffix('.yaml')}.yaml"
    if path.parent == Path(".") and shipped.is_file():
        return shipped
    names = list_recipes()
    close = difflib.get_close_matches(path.stem, names, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(f"recipe {name_or_path} is neither a file nor a shipped recipe{hint} "
                      f"(shipped: {', '.join(names)})")


def describe(name: str) -> str:
    """The first comment line of a shipped recipe."""
    for line in recipe_path(name).read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""
