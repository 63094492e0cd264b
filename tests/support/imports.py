"""The project's own import graph, read from the source (no module is imported).

Used by the layout tests: which files a DVC stage's code imports, transitively, so that a
test can check they are all among the stage's deps in dvc.yaml.
"""

from __future__ import annotations

import ast
from pathlib import Path

PROJECT_PACKAGES = ("tasks", "flows", "serving", "ftllm")


def module_file(root: Path, name: str) -> Path | None:
    """The source file of project module `name`, or None for a third-party module."""
    parts = name.split(".")
    if parts[0] not in PROJECT_PACKAGES:
        return None
    for candidate in (root.joinpath(*parts).with_suffix(".py"), root.joinpath(*parts, "__init__.py")):
        if candidate.is_file():
            return candidate
    return None


def _imported_names(path: Path, module: str) -> set[str]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_closure(root: Path, module: str) -> set[Path]:
    """Every project source file that `python -m module` may import, the module's own included.

    Imports inside functions count too: a stage that imports lazily still runs that code.
    Parent packages of each module count as well (their `__init__.py` runs first).
    """
    seen: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        path = module_file(root, name)
        if path is None or path in seen:
            continue
        seen.add(path)
        for imported in _imported_names(path, name):
            parts = imported.split(".")
            todo.extend(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return seen


def project_modules(root: Path) -> dict[str, Path]:
    """Every module of the project's packages, by dotted name."""
    modules = {}
    for package in PROJECT_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def import_cycles(root: Path) -> list[list[str]]:
    """The project's import cycles: groups of modules that import each other, directly or
    through others (imports inside functions count: a lazy import is still a dependency)."""
    modules = project_modules(root)
    graph = {name: sorted({imported for imported in _imported_names(path, name) if imported in modules} - {name})
             for name, path in modules.items()}
    # Tarjan's strongly connected components.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for name in graph:
        if name not in index:
            visit(name)
    return cycles
