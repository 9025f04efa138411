"""No import circles in the shared config and the codecs, lazy imports in functions included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CODEC_MODULES = ("blockwise", "casts", "feedback", "powersgd", "topk")


def module_imports(package: str) -> dict[str, set[str]]:
    """Each module of `package` (dotted) -> the modules of the same package it imports anywhere."""
    folder = ROOT / package.replace(".", "/")
    modules = {f"{package}.{p.stem}": p for p in folder.glob("*.py") if p.stem != "__init__"}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            found |= {t for t in targets if t in modules}
        graph[name] = found - {name}
    return graph


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


@pytest.mark.parametrize("package", ["configs", "worker.compression", "protos"])
def test_no_import_circles(package: str) -> None:
    found = cycle(module_imports(package))
    assert found is None, " -> ".join(found or [])


def test_codec_modules_import_only_the_base() -> None:
    graph = module_imports("worker.compression")
    for name in CODEC_MODULES:
        assert graph[f"worker.compression.{name}"] <= {"worker.compression.base"}, name
    assert graph["worker.compression.base"] == set()
    assert graph["worker.compression.registry"] >= {f"worker.compression.{m}" for m in CODEC_MODULES
                                                     if m != "feedback"}  # error feedback wraps a codec


def test_the_cycle_finder_finds_one() -> None:
    assert cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None


def test_configs_codecs_needs_no_protos() -> None:
    tree = ast.parse((ROOT / "configs/codecs.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not any(str(m).startswith(("protos", "worker", "coordinator", "pydantic")) for m in imported)
