"""The house's import graph: circles between modules or between packages, and private names imported across
modules. ``python scripts/import_graph.py`` prints all three (empty lists: a clean house); tests/test_import_graph.py
asserts it. Every import counts, at module level or inside a function: a lazy import hides a circle, not removes it.
A package is a subfolder of ``src/retain`` (``retain.methods``); a top-level module is its own package."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "retain"


def modules(root: Path = SRC) -> dict[str, Path]:
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports(root: Path = SRC) -> tuple[dict[str, set[str]], list[tuple[str, str]]]:
    """(module → the retain modules it imports, [(importer, "module.private_name")])."""
    mods = modules(root)
    edges: dict[str, set[str]] = {name: set() for name in mods}
    private = []
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                target = node.module or ""
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([target] if target else []))
                if not target.startswith("retain"):
                    continue
                for alias in node.names:
                    full = f"{target}.{alias.name}"
                    edges[name].add(full if full in mods else target)
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        private.append((name, full))
            elif isinstance(node, ast.Import):
                edges[name].update(a.name for a in node.names if a.name.startswith("retain"))
    return {k: {t for t in v if t in mods and t != k} for k, v in edges.items()}, private


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    component.append(top)
                    if top == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def package_of(module: str) -> str:
    return ".".join(module.split(".")[:2])


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for source, targets in graph.items():
        for target in targets:
            if package_of(source) != package_of(target):
                out.setdefault(package_of(source), set()).add(package_of(target))
    return out


def main() -> int:
    graph, private = imports()
    report = {"module circles": circles(graph), "package circles": circles(package_graph(graph)),
              "private names imported across modules": private}
    for title, items in report.items():
        print(f"{title}: {items}")
    return 1 if any(report.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
