"""Package layout invariants: no import cycles, no module reaching into another's private names,
and the folders read as the pipeline."""
from __future__ import annotations

import ast
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import replication
from replication import paths

PACKAGE = paths.PROJECT_ROOT / "replication"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(p for p in parts if p != "__init__")


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    """Dotted name (inside the package) that a relative `from ... import` reads from."""
    base = module.split(".") if module else []
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
    return ".".join(base + ([node.module] if node.module else []))


def _imports(path: Path, top_level_only: bool) -> list[tuple[str, list[str]]]:
    """(imported module, imported names) of the package-internal imports of one file; `from . import x`
    counts as importing module x."""
    module, is_package = _module_name(path), path.name == "__init__.py"
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = []
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.level >= 1:
            target = _resolve(module, node, is_package)
            names = [a.name for a in node.names]
            submodules = [n for n in names if (PACKAGE / Path(*target.split("."), f"{n}.py")).exists()]
            out.extend(((f"{target}.{n}" if target else n), []) for n in submodules)
            rest = [n for n in names if n not in submodules]
            if rest:
                out.append((target, rest))
    return out


def _files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _graph(top_level_only: bool) -> dict[str, set[str]]:
    return {_module_name(p): {m for m, _ in _imports(p, top_level_only) if m} for p in _files()}


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
    graph = _graph(top_level_only=True)
    assert "sae.directions" in graph["analysis.matching"] and "io" in graph["analysis.matching"]   # the graph is read
    assert _find_cycle(graph) is None


def test_cycle_finder_finds_a_planted_cycle() -> None:
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_imports_private_names_of_another() -> None:
    offenders = [(_module_name(p), m, n) for p in _files() for m, names in _imports(p, top_level_only=False)
                 for n in names if n.startswith("_")]
    assert not offenders, offenders


def test_layers_only_import_downstream() -> None:
    """lm -> sae -> analysis -> studies: a module never imports from a later stage of the pipeline."""
    order = {"lm": 0, "sae": 1, "analysis": 2, "studies": 3}
    bad = []
    for p in _files():
        here = _module_name(p).split(".")[0]
        for target, _ in _imports(p, top_level_only=False):
            there = target.split(".")[0]
            if here in order and there in order and order[there] > order[here]:
                bad.append((_module_name(p), target))
    assert not bad, bad


def test_short_imports_reach_every_module() -> None:
    """`from replication import matching` (what notebooks write) works for every moved module."""
    for name, target in replication._MODULES.items():
        module = getattr(replication, name)
        assert module.__name__ == f"replication.{target}"
        assert (PACKAGE / Path(*target.split("."))).with_suffix(".py").exists()


def test_make_figures_runs_the_owner_of_shared_families_first(tmp_path: Path) -> None:
    """Notebook 06's tokens panel loads notebook 16's budget families and 07's architecture panel loads 17's: `make
    figures` must run 16 before 06 and 17 before 07, or the loading notebook trains them itself and passes 90 minutes
    on the default profile. Read from make's dry run (-B: as if nothing were built)."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    out = subprocess.run(["make", "-n", "-B", "figures", "PROFILE=smoke", f"EXECUTED={tmp_path}"], cwd=paths.PROJECT_ROOT,
                         capture_output=True, text=True, check=True).stdout
    order = re.findall(r"^\s*notebooks/(\d\d_\w+)\.ipynb ", out, re.MULTILINE)   # papermill's input notebook
    names = [p.stem for p in sorted((paths.PROJECT_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))]
    assert sorted(order) == sorted(names), order
    position = {name[:2]: i for i, name in enumerate(order)}
    assert position["16"] < position["06"] and position["17"] < position["07"], order
    assert position["01"] < position["18"] and position["16"] < position["18"], order
    assert position["00"] == 0, order


@pytest.mark.parametrize("notebook", sorted(p.stem for p in paths.NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb")))
def test_papermill_reads_every_parameter(notebook: str) -> None:
    """Every name the parameters cell assigns is one papermill can inspect (`papermill --help-notebook`, and no
    "Passed unknown parameter" warning when a params file sets it). Papermill skips a line holding more than one
    `=`, so a comment such as `# >= 4 seeds` hides its parameter."""
    import json

    import papermill

    cells = json.loads((paths.NOTEBOOKS_DIR / f"{notebook}.ipynb").read_text())["cells"]
    (cell,) = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assigned = {t.id for node in ast.parse("".join(cell["source"])).body if isinstance(node, ast.Assign)
                for t in node.targets if isinstance(t, ast.Name)}
    assert assigned and set(papermill.inspect_notebook(str(paths.NOTEBOOKS_DIR / f"{notebook}.ipynb"))) == assigned
