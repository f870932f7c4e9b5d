"""The project's modules import each other without circles (module-level and function-level imports alike).

A function-level import that closes a circle still ties two modules into one unit that cannot be understood,
tested or moved alone; so every import counts, except those under ``if TYPE_CHECKING:`` (annotations only).
A package's ``__init__`` is not an edge from its modules (Python runs it first, but nothing of it is used).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "utils")


def project_modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the project (packages and the top-level scripts)."""
    modules = {path.stem: path for path in ROOT.glob("*.py")}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


class ImportCollector(ast.NodeVisitor):
    """The project modules one module imports, wherever the import statement stands."""

    def __init__(self, module: str, is_package: bool, known: set[str]):
        self.package = module if is_package else module.rpartition(".")[0]
        self.known = known
        self.found: set[str] = set()

    def visit_If(self, node: ast.If) -> None:
        if "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            parent = self.package.split(".")[: len(self.package.split(".")) - node.level + 1]
            base = ".".join([*parent, base] if base else parent)
        submodules = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in self.known]
        if len(submodules) < len(node.names):  # names defined in the module itself (or its package __init__)
            self._add(base)
        for name in submodules:  # ``from utils.train import config``: the module utils.train.config
            self._add(name)

    def _add(self, name: str) -> None:
        while name and name not in self.known:  # ``import a.b.c`` where c is a function: the module a.b
            name = name.rpartition(".")[0]
        if name:
            self.found.add(name)


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    graph = {}
    for name, path in modules.items():
        collector = ImportCollector(name, path.name == "__init__.py", set(modules))
        collector.visit(ast.parse(path.read_text(encoding="utf-8")))
        graph[name] = collector.found - {name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            for target in edges:
                if target not in index:
                    index[target] = low[target] = len(index)
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(sorted(graph[target]))))
                    break
                if target in on_stack:
                    low[node] = min(low[node], index[target])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def test_the_circle_finder_finds_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert circles(graph) == [["a", "b", "c"]]


def test_project_imports_have_no_circles():
    graph = import_graph()
    assert len(graph) > 100 and "utils.train.engine" in graph["utils.runners.train"] | {
        target for source in graph["utils.runners.train"] for target in graph[source]}
    found = circles(graph)
    details = [" -> ".join(component) + "  (" + "; ".join(
        f"{m} imports {sorted(graph[m] & set(component))}" for m in component) + ")" for component in found]
    assert not found, "import circles:\n" + "\n".join(details)
