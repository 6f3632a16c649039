"""The package's import structure, read from the source (no module is imported): no import cycle between modules, and
the layers import downwards only (runtime <- export <- training / bench <- serve / CLI). Imports inside functions are
deliberate lazy edges (an optional backend, a heavy stack loaded on first use) and are not counted; imports under
`if TYPE_CHECKING:` neither."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the import path of each source folder (pyproject.toml's package-dir)
PACKAGES = {"skipdecode": "skipdecode", "skipdecode.export": "export", "skipdecode.runtime": "runtime",
            "skipdecode.training": "training", "skipdecode.bench": "bench", "skipdecode.serve": "skipdecode/serve"}
# what each layer may import at module level (beyond itself)
ALLOWED = {
    "skipdecode.runtime": set(),
    "skipdecode.export": {"skipdecode.runtime"},
    "skipdecode.training": {"skipdecode.runtime", "skipdecode.export"},
    "skipdecode.bench": {"skipdecode.runtime", "skipdecode.export", "skipdecode.cliargs"},
    "skipdecode.serve": {"skipdecode.runtime", "skipdecode.cliargs"},
}


def modules() -> dict[str, Path]:
    out = {}
    for package, folder in PACKAGES.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            out[name] = path
    return out


def _top_level_imports(tree: ast.Module):
    """Import nodes run when the module loads: module level, inside if/try/with blocks, not under TYPE_CHECKING and
    not inside functions or classes."""
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            if not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                todo += node.body + node.orelse
        elif isinstance(node, (ast.Try, ast.With)):
            todo += node.body + getattr(node, "orelse", []) + getattr(node, "finalbody", [])
            todo += [n for h in getattr(node, "handlers", []) for n in h.body]


def import_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports when it loads."""
    known = modules()
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
        deps = set()
        for node in _top_level_imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(parent + ([base] if base else []))
                # `from pkg import mod` imports the module pkg.mod when there is one
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
            deps |= {t for t in targets if t in known and t != name}
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as e:
        return list(e.args[1])
    return None


def layer(module: str) -> str | None:
    return next((p for p in ALLOWED if module == p or module.startswith(p + ".")), None)


def test_the_graph_sees_the_package():
    graph = import_graph()
    assert len(graph) > 60 and "skipdecode.runtime.batcher" in graph
    assert {"skipdecode.runtime.scheduler", "skipdecode.runtime.request"} <= graph["skipdecode.runtime.batcher"]
    assert "skipdecode.runtime.generator" in graph["skipdecode.runtime.engine"]


def test_no_import_cycle():
    assert find_cycle(import_graph()) is None


def test_negative_control_a_cycle_is_found():
    graph = import_graph()
    graph["skipdecode.runtime.kv"] = graph["skipdecode.runtime.kv"] | {"skipdecode.runtime.batcher"}
    cycle = find_cycle(graph)
    assert cycle is not None and "skipdecode.runtime.kv" in cycle


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_layers_import_downwards_only(package):
    graph = import_graph()
    wrong = {(m, d) for m, deps in graph.items() if layer(m) == package for d in deps
             if layer(d) != package and not any(d == a or d.startswith(a + ".") for a in ALLOWED[package])}
    assert not wrong, sorted(wrong)
