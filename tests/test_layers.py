"""The package's import graph: no cycles, and storage never reaches up into the loader or compile cache.

Read from the source (the AST of every module, imports inside functions included, ``if TYPE_CHECKING``
blocks left out since they never run), so a circle hidden in a function-level import is caught too:
such an import works today only because of the order things happen to be imported in.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import networkx as nx

import fastload_core

PACKAGE = Path(fastload_core.__file__).parent
ROOT = "fastload_core"
# Lower layers never import upper ones: storage knows bytes, the loader knows tensors.
FORBIDDEN = {f"{ROOT}.storage": (f"{ROOT}.loader", f"{ROOT}.compile_cache", f"{ROOT}.model")}
# The command-line modules sit above every layer (``fastload cache ls`` lists the tiers and the compile
# cache together); they live beside the feature they drive, so they are exempt from the layer rule.
CLI_MODULES = {f"{ROOT}.storage.commands"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_nodes(node: ast.AST) -> Iterator[ast.AST]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for other in child.orelse:
                yield other
                yield from _runtime_nodes(other)
            continue
        yield child
        yield from _runtime_nodes(child)


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The fastload_core modules ``name`` imports, each resolved to the most specific module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            targets = [f"{stem}.{alias.name}" if f"{stem}.{alias.name}" in known else stem for alias in node.names]
        for target in targets:
            while target and target not in known:  # `import a.b.c` of a name inside a module
                target = target.rpartition(".")[0]
            if target.startswith(ROOT) and target != name:
                found.add(target)
    return found


def graph() -> nx.DiGraph:
    found = modules()
    known = set(found)
    edges = nx.DiGraph()
    edges.add_nodes_from(known)
    for name, path in found.items():
        edges.add_edges_from((name, target) for target in imports_of(name, path, known))
    return edges


def test_the_walker_sees_function_level_and_relative_imports() -> None:
    edges = graph()
    assert edges.has_edge(f"{ROOT}.loader.api", f"{ROOT}.loader.streaming")  # inside a function
    assert edges.has_edge(f"{ROOT}.storage.store", f"{ROOT}.plugins")  # `from ..plugins import`
    assert len(edges) > 50


def test_the_package_has_no_import_cycles() -> None:
    cycles = sorted(" -> ".join([*cycle, cycle[0]]) for cycle in nx.simple_cycles(graph()))
    assert cycles == []


def test_storage_never_imports_the_layers_above_it() -> None:
    bad = [f"{source} -> {target}" for source, target in graph().edges
           for lower, uppers in FORBIDDEN.items()
           if (source == lower or source.startswith(lower + ".")) and target.startswith(uppers)
           and source not in CLI_MODULES]
    assert bad == []
