"""The folders show the data path: each imports only what the design allows, and no
module imports itself back through another."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = ("kv_store", "engine_host", "prefill_workers", "decode_workers", "router", "cluster", "bench")
# Which of our folders each may import (the design's table).
ALLOWED = {
    "kv_store": set(),
    "engine_host": {"kv_store"},
    "prefill_workers": {"kv_store", "engine_host"},
    "decode_workers": {"kv_store", "engine_host"},
    "router": {"kv_store"},
    "cluster": set(FOLDERS),
    "bench": set(FOLDERS),
    "kvmesh_client": set(),
}
# The one exception, and why: vLLM imports only the module its kv_connector_module_path
# names, in every process that builds a connector, so the facade must import both sides.
EXCEPTIONS = {("engine_host/connector.py", "prefill_workers"), ("engine_host/connector.py", "decode_workers")}


def _imports(path: Path) -> set[str]:
    """The modules ``path`` imports (absolute names), at any depth."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def _modules() -> dict[str, Path]:
    out = {}
    for folder in (*FOLDERS, "kvmesh_client"):
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts[:-1]) if rel.name == "__init__" else list(rel.parts)
            name = ".".join(parts)
            out["kvmesh." + name if folder in FOLDERS else name] = path
    return out


def test_each_folder_imports_only_what_the_design_allows():
    wrong = []
    for name, path in _modules().items():
        folder = path.relative_to(ROOT).parts[0]
        for imported in _imports(path):
            parts = imported.split(".")
            target = parts[1] if parts[0] == "kvmesh" and len(parts) > 1 else parts[0]
            if target in FOLDERS and target != folder and target not in ALLOWED[folder]:
                if (str(path.relative_to(ROOT)), target) not in EXCEPTIONS:
                    wrong.append(f"{path.relative_to(ROOT)} imports {imported}")
    assert not wrong, wrong


def import_graph() -> dict[str, set[str]]:
    """Each of our modules -> our modules it imports at module level (imports inside
    functions run late and may go anywhere the table allows)."""
    modules = _modules()
    graph = defaultdict(set)
    for name, path in modules.items():
        for node in ast.parse(path.read_text()).body:
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            graph[name].update(n for n in names if n in modules and n != name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of ``graph`` as the modules along it (first == last), or []."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str]:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [node, nxt] if nxt in path else [node, nxt]
            if nxt not in state:
                found = visit(nxt, path + [node])
                if found:
                    return found
        state[node] = 2
        return []

    for name in sorted(graph):
        if name not in state:
            found = visit(name, [])
            if found:
                return found
    return []


def test_no_module_level_import_cycles():
    cycle = find_cycle(import_graph())
    assert not cycle, " -> ".join(cycle)


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) in (
        ["a", "b", "c", "a"], ["b", "c", "a", "b"], ["c", "a", "b", "c"])
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []
