"""The package's import graph has no cycles, counting imports inside functions and under
``TYPE_CHECKING``: every module of dlis_market can be read bottom-up (protocol below node, broker
and oracle; no two modules that need each other)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "dlis_market"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dlis_market"):
                for alias in node.names:  # `from pkg import module` names the module itself
                    target = f"{node.module}.{alias.name}"
                    graph[name].add(target if target in modules else node.module)
            elif isinstance(node, ast.Import):
                graph[name].update(a.name for a in node.names if a.name in modules)
    for targets in graph.values():
        targets &= modules.keys()
    return graph


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the modules along it, or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        path.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return [*path[path.index(w) :], w]
            if w not in state and (found := visit(w)) is not None:
                return found
        path.pop()
        state[v] = 2
        return None

    for v in sorted(graph):
        if v not in state and (found := visit(v)) is not None:
            return found
    return None


def test_no_module_imports_itself_through_others() -> None:
    graph = import_graph()
    assert len(graph) > 150  # the scan found the package
    assert cycle(graph) is None, " -> ".join(cycle(graph) or [])


def test_the_scan_finds_a_cycle_when_there_is_one() -> None:
    graph = import_graph()
    graph["dlis_market.protocol.receipts"].add("dlis_market.broker.ledger")  # ledger -> ... -> receipts
    found = cycle(graph)
    assert found is not None and found[0] == found[-1]
    assert "dlis_market.protocol.receipts" in found and "dlis_market.broker.ledger" in found
