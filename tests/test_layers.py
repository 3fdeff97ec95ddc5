"""The layering of ../shared/design.md, read from the source: every import (module level or inside a function) points
down, siblings do not import each other, adapters never import the server, and the packages form no cycle."""

from __future__ import annotations

import ast
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import grape_rewards

ROOT = Path(grape_rewards.__file__).parent

LAYERS: dict[str, int] = {
    "devices": 0, "jsonl": 0, "index_list": 0, "_version": 0,  # helpers every layer may use
    "retrievers": 1,
    "rewards": 2, "corpus": 2, "labels": 2,  # siblings: rewards and corpus never import each other
    "scorer": 3, "alarms": 3, "demo_data": 3, "ensemble": 3, "framework_io": 3, "scoring_io": 3,
    "server": 4, "client": 4,
    "adapters": 5,
    "distributed": 6,
    "datasets": 7, "eval": 7, "rewrite": 7, "prepare": 7, "cli_args": 7, "serve_cli": 7,
    "cli": 8, "demo": 8,  # the demo shows the scorer and the reward benchmark side by side
}
"""Each top-level module or package of grape_rewards and its layer (the root ``__init__`` only re-exports)."""
FORBIDDEN = {("rewards", "corpus"), ("corpus", "rewards"), ("adapters", "server"), ("client", "server"),
             ("server", "client")}


def unit(module: str) -> str:
    """The top-level module or package of ``grape_rewards.x.y`` (``x``); the root package is ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def imports() -> set[tuple[str, str]]:
    """(importing unit, imported unit) of every ``grape_rewards`` import in the package, between different units."""
    return {(unit(module), unit(target)) for module, target in imported_modules()
            if target.startswith("grape_rewards.") and unit(target) != unit(module)}


def imported_modules() -> Iterator[tuple[str, str]]:
    """(importing module, imported module) of every import in the package (``from . import x`` names the package)."""
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        package = parts[:-1]  # what a relative import starts from, for a module and an __init__ alike
        module = ".".join(package if path.name == "__init__.py" else parts)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = package[:len(package) - node.level + 1] if node.level else []
                targets = [".".join(base + ([node.module] if node.module else []))]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            for target in targets:
                yield module, target


def test_every_unit_has_a_layer() -> None:
    units = {p.stem if p.is_file() else p.name for p in ROOT.iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").exists())}
    assert units == set(LAYERS), "give each new top-level module or package a layer here (design.md)"


def test_imports_point_down_and_siblings_stay_apart() -> None:
    edges = {(a, b) for a, b in imports() if a and b}
    upward = sorted((a, b) for a, b in edges if LAYERS[b] > LAYERS[a])
    assert not upward, f"imports of a layer above: {upward}"
    assert not sorted(edges & FORBIDDEN), f"forbidden imports: {sorted(edges & FORBIDDEN)}"


def test_only_the_cli_imports_the_package_root() -> None:
    """The root package re-exports every layer, so a module below the CLI that imports it (``from .. import
    __version__``) reaches above its layer; the version is read from ``grape_rewards._version``."""
    root = {module for module, target in imported_modules() if target == "grape_rewards"} - {"grape_rewards.cli"}
    assert not root, f"modules that import the package root: {sorted(root)}"


def test_no_import_cycles_between_packages() -> None:
    graph: dict[str, set[str]] = defaultdict(set)
    for a, b in imports():
        if a and b:
            graph[a].add(b)

    def reachable(start: str) -> set[str]:
        seen: set[str] = set()
        todo = [start]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        return seen

    cycles = sorted(a for a in list(graph) if a in reachable(a))
    assert not cycles, f"packages on an import cycle: {cycles}"
