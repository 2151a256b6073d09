"""No import cycles: the package (and the paper harness) is a layered graph, read from the source.

Every import counts, top-level or inside a function (a lazy import only hides a cycle), except those under
``if TYPE_CHECKING:``, which never run. ``from a import b`` is an edge to ``a.b`` when that is a module, else
to ``a``; importing a submodule is not counted as importing its parent package's ``__init__``.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules(package: Path) -> dict[str, Path]:
    found = {}
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, name: str, is_package: bool) -> list[str]:
    """Every imported name (``a.b`` for ``from a import b``), skipping ``if TYPE_CHECKING:`` bodies."""
    out: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            out.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = name.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                source = ".".join([*anchor, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            out.append(source)
            out.extend(f"{source}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return out


def import_graph(package: Path) -> dict[str, set[str]]:
    modules = _modules(package)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        targets = {t for t in _imports(tree, name, path.name == "__init__.py") if t in modules}
        # ``from a import b`` names both a and a.b: when a.b is a module, the edge is to a.b only
        graph[name] = {t for t in targets if not any(o.startswith(t + ".") for o in targets)} - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def test_the_checker_finds_a_cycle_and_skips_type_checking_imports() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import x.y\ndef f():\n    import z\n")
    assert _imports(tree, "m", False) == ["typing", "typing.TYPE_CHECKING", "z"]
    assert _imports(ast.parse("from . import b\nfrom .c import d"), "p.a", False) == ["p", "p.b", "p.c", "p.c.d"]


def test_the_package_has_no_import_cycles() -> None:
    graph = import_graph(ROOT / "flwr_serverless")
    assert len(graph) > 50 and sum(map(len, graph.values())) > 100  # the walk saw the package
    assert cycles(graph) == []


def test_the_paper_harness_has_no_import_cycles() -> None:
    graph = import_graph(ROOT / "benchmarks" / "paper")
    assert "benchmarks.paper.grid" in graph["benchmarks.paper.tables"]  # the walk saw the harness
    assert cycles(graph) == []
