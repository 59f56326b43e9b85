"""Package layout invariants: no import cycles, no module reaching into another's private names."""
from __future__ import annotations

import ast
from pathlib import Path

from replication import paths

PACKAGE = paths.PROJECT_ROOT / "replication"


def _imports(path: Path, top_level_only: bool) -> list[tuple[str, list[str]]]:
    """(imported module, imported names) of the package-internal imports of one file."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = []
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                out.append((node.module.split(".")[0], [a.name for a in node.names]))
            else:
                out.extend((a.name, []) for a in node.names)
    return out


def _graph(top_level_only: bool) -> dict[str, set[str]]:
    return {p.stem: {m for m, _ in _imports(p, top_level_only)} for p in PACKAGE.glob("*.py")}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_module_level_imports_have_no_cycle() -> None:
    assert _find_cycle(_graph(top_level_only=True)) is None


def test_cycle_finder_finds_a_planted_cycle() -> None:
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_imports_private_names_of_another() -> None:
    offenders = [(p.stem, m, n) for p in PACKAGE.glob("*.py") for m, names in _imports(p, top_level_only=False)
                 for n in names if n.startswith("_")]
    assert not offenders, offenders
