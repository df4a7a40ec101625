"""The recipes that ship with attnconv, as package data: ``attnconv train --config NAME``.

A recipe is a YAML mapping over a task's config (:mod:`attnconv.classification.config`,
:mod:`attnconv.detection.config`, :mod:`attnconv.segmentation.config`) that names its task
(``task: detection``) and states the whole model, so nothing of one recipe leaks into another.
Its first comment lines say where it comes from.
"""

from __future__ import annotations

import difflib
import re
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


#: A sentence ends at a full stop before a capital or the end, never at "et al." or "e.g.".
_SENTENCE_END = re.compile(r"(?<!\bal)(?<!\be\.g)\.(?=\s+[A-Z(\"`]|\s*$)")


def describe(name: str) -> str:
    """The first sentence of a shipped recipe's opening comment (its prose lines, before the
    first indented example command), whole."""
    prose = []
    for line in recipe_path(name).read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line[1:]
        if text.startswith("   ") or not text.strip():  # an example command, or a blank line
            break
        prose.append(text.strip())
    text = " ".join(prose)
    end = _SENTENCE_END.search(text)
    return text[:end.end()] if end else text
