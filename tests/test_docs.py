"""The README and docs/ stay true: every ```python block runs (or, where it needs data or
weights this machine does not hold, compiles), every relative link points at a file, and the
README stays a front door of at most 200 lines.

A block that cannot run here is preceded by ``<!-- compile-only: REASON -->``, the reason
saying what it needs; a block that takes longer than a few seconds by ``<!-- slow: REASON -->``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = re.compile(r"<!--\s*(compile-only|slow)\s*:\s*(.*?)\s*-->")
FENCE = re.compile(r"^```(\w*)\s*$")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


@dataclass
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    code: str
    markers: dict[str, str]  # marker name -> its reason

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def python_blocks(page: Path) -> list[Block]:
    """The ```python blocks of ``page``, each with the markers on the lines right above it."""
    lines = page.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        if fence.group(1) == "python":
            markers, k = {}, i - 1
            while k >= 0 and (found := MARKER.fullmatch(lines[k].strip())):
                markers[found.group(1)] = found.group(2)
                k -= 1
            blocks.append(Block(page, i + 1, "\n".join(lines[i + 1:end]) + "\n", markers))
        i = end + 1
    return blocks


BLOCKS = [block for page in PAGES for block in python_blocks(page)]


def test_the_docs_pages_and_their_blocks_were_found() -> None:
    names = {page.name for page in PAGES}
    assert {"README.md", "layers.md", "models.md", "training.md", "detection.md",
            "segmentation.md", "yolo.md", "export.md", "benchmarks.md", "layout.md"} <= names
    assert len(BLOCKS) >= 19
    assert sum("compile-only" not in block.markers for block in BLOCKS) >= 14  # most run


def test_every_marker_sits_right_above_a_python_block() -> None:
    """A marker anywhere else (a typo, a blank line before the fence) would be silently
    ignored and its block run."""
    for page in PAGES:
        lines = page.read_text().splitlines()
        for i, line in enumerate(lines):
            if "<!--" not in line or not re.search(r"compile-only|slow", line):
                continue
            assert MARKER.fullmatch(line.strip()), f"{page.name}:{i + 1}: malformed marker {line}"
            following = next(rest for rest in lines[i + 1:] if not MARKER.fullmatch(rest.strip()))
            assert following.strip() == "```python", f"{page.name}:{i + 1}: not above a block"


@pytest.mark.parametrize("block", [
    pytest.param(block, id=block.name,
                 marks=[pytest.mark.slow] if "slow" in block.markers else [])
    for block in BLOCKS])
def test_python_block(block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for marker, reason in block.markers.items():
        # The reason says what the block needs or costs, in words a reader can act on.
        assert len(reason.split()) >= 2, f"{block.name}: {marker} without a reason"
    code = compile(block.code, block.name, "exec")
    if "compile-only" in block.markers:
        return
    monkeypatch.chdir(tmp_path)  # files a block writes land here
    exec(code, {"__name__": "__docs__"})


def _relative_links(page: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)  # nor code blocks
    text = re.sub(r"`[^`]*`", "", text)  # code spans (which may wrap a line) are not links
    return [target for target in LINK.findall(text)
            if not re.match(r"[a-z][a-z0-9+.-]*:", target) and not target.startswith("#")]


def test_every_relative_link_resolves_to_a_file() -> None:
    found = 0
    for page in PAGES:
        for target in _relative_links(page):
            path = (page.parent / target.split("#")[0]).resolve()
            assert path.is_file(), f"{page.relative_to(ROOT)}: {target} does not exist"
            found += 1
    assert found >= 48  # the links were found


def test_every_figure_in_docs_is_shown_on_a_page() -> None:
    shown = {(page.parent / target).resolve() for page in PAGES for target in _relative_links(page)}
    for figure in sorted((ROOT / "docs").glob("*.png")):
        assert figure.resolve() in shown, f"docs/{figure.name} is on no page"


def test_the_readme_links_every_docs_page() -> None:
    linked = {Path(target.split("#")[0]).name for target in _relative_links(ROOT / "README.md")}
    assert {page.name for page in PAGES[1:]} <= linked


def test_the_readme_is_a_front_door() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; topics belong in docs/"
    setup = "\n".join(lines[:20])  # the two set-up commands come first
    assert "make demo" in setup and "make test" in setup
