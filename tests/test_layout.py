"""The layout stays readable: no module grows past ~600 lines, and no two modules of infernod
(or of inferno_tui) import each other in a circle, directly or through others: a cycle means
neither can be read, tested or moved alone.

Both checks read the source only (``ast``); nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 600
# Modules allowed past MAX_LINES, each with the reason it is one piece. Keep it short.
OVERSIZE: dict[str, str] = {}


def _modules(package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every module of ``package`` (a top-level dir)."""
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def test_no_module_is_over_the_line_limit() -> None:
    too_long = {}
    for package in ("infernod", "inferno_tui"):
        for name, path in _modules(package).items():
            n = len(path.read_text().splitlines())
            if n > MAX_LINES and name not in OVERSIZE:
                too_long[name] = n
    assert not too_long, (f"modules over {MAX_LINES} lines (split them along a seam, or "
                          f"justify them in OVERSIZE): {too_long}")


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.Module) -> list[tuple[str, str | None]]:
    """(module, imported name or None) for every import that runs: at module level and
    inside functions alike (a function-level import only defers a cycle to the first call,
    it does not remove it). Imports under ``if TYPE_CHECKING:`` never run; they are left
    out: an annotation may name a type from a module that imports this one."""
    found: list[tuple[str, str | None]] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                found.extend((alias.name, None) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and not child.level:
                found.extend((child.module, alias.name) for alias in child.names)
            visit(child)

    visit(tree)
    return found


def _graph(package: str = "infernod") -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports."""
    modules = _modules(package)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = graph.setdefault(name, set())
        for module, attr in _imports(ast.parse(path.read_text())):
            if attr is not None and f"{module}.{attr}" in modules:
                target = f"{module}.{attr}"  # from infernod.daemon import uploads
            elif module in modules:
                target = module
            else:
                continue  # outside the package
            if target != name:
                edges.add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return out


def test_the_import_graph_has_edges() -> None:
    graph = _graph()
    assert "infernod.daemon.server" in graph["infernod.daemon.core"]
    assert "infernod.daemon.uploads" in graph["infernod.daemon.core"]  # from ... import uploads
    assert "infernod.backends.onnx_inspect" in graph["infernod.daemon.registry"]  # in a function


@pytest.mark.parametrize("package", ["infernod", "inferno_tui"])
def test_no_import_cycles(package: str) -> None:
    cycles = _cycles(_graph(package))
    assert not cycles, f"modules that import each other in a circle: {cycles}"


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
