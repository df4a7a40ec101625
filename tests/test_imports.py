"""The package's import structure: every module imports in a fresh interpreter, and no module
reaches itself through its imports (deferred ones inside functions included)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import attnconv

PACKAGE = Path(attnconv.__file__).parent


def modules() -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, whether it is a package's ``__init__``)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the attnconv modules it imports anywhere in its file.

    ``from attnconv.x import y`` is an arrow to ``attnconv.x.y`` when that is a module and to
    ``attnconv.x`` otherwise; the parent packages that Python runs first are not arrows (a
    package's ``__init__`` importing its own submodules is how packages are built).
    """
    known = modules()

    def owner(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, (path, is_package) in known.items():
        package = name if is_package else name.rpartition(".")[0]
        targets: list[str] = []
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(parent + ([base] if base else []))
                targets += [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                            for alias in node.names]
        graph[name] = {m for t in targets if t.split(".")[0] == "attnconv"
                       and (m := owner(t)) is not None and m != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return [*path[path.index(target):], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_is_read_from_every_module():
    graph = import_graph()
    assert {"attnconv", "attnconv.layers.create", "attnconv.errors"} <= set(graph)
    # the factory imports the layers, the recipes the leaf error module
    assert "attnconv.layers.attention" in graph["attnconv.layers.create"]
    assert graph["attnconv.recipes"] >= {"attnconv.errors"}


def test_find_cycle_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_module_of_the_package_imports_itself_through_others():
    graph = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_layers_never_import_their_factory():
    graph = import_graph()
    layer_modules = [m for m in graph if m.startswith("attnconv.layers.")
                     and m != "attnconv.layers.create"]
    assert "attnconv.layers.aw_conv" in layer_modules
    assert not [m for m in layer_modules if "attnconv.layers.create" in graph[m]]


TASKS = ("attnconv.classification", "attnconv.detection", "attnconv.segmentation")


def test_the_engine_imports_no_task():
    graph = import_graph()
    engine = [m for m in graph if m.startswith("attnconv.engine.")]
    assert "attnconv.engine.trainer" in engine and "attnconv.engine.run" in engine
    upward = {m: sorted(t for t in graph[m] if t.startswith(TASKS)) for m in engine}
    assert not {m: t for m, t in upward.items() if t}, f"the engine imports a task: {upward}"
    # the tasks do build on the engine
    assert "attnconv.engine.trainer" in graph["attnconv.classification.run"]


@pytest.mark.slow  # Lightning, torchvision's detection and ultralytics: tens of seconds
def test_every_module_imports_in_a_fresh_interpreter():
    # a __main__ module runs its program when imported
    names = [name for name in sorted(modules()) if not name.endswith(".__main__")]
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    result = subprocess.run([sys.executable, "-c", code, *names], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
