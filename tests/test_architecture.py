"""The package's floors and the repository's hygiene, read from the source (no import runs).

Floors, imports only downward: core (``megatron_mhc.core``, ``megatron_mhc.kernels``, the package
root) <- Megatron-LM glue (``megatron_mhc.training``, the ``megatron_mhc.hooks`` name patched trees
import) <- tools (``megatron_mhc.tools``, ``python -m megatron_mhc``). Every import statement counts,
also those inside functions. No import circle between modules; nothing in the package imports the
tests; no symbolic link in the repository.
"""

import ast
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Folder -> the package it ships as (setup.py's package_dir).
SOURCES = {"megatron_mhc": "megatron_mhc", "kernels": "megatron_mhc.kernels",
           "patches": "megatron_mhc.patches"}
FLOOR_NAMES = ("core", "glue", "tools")


def _modules():
    """``{module name: path}`` of every Python file that ships in the package."""
    found = {}
    for folder, package in SOURCES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def floor(module: str) -> int:
    """0 core, 1 Megatron-LM glue, 2 tools."""
    if module.startswith(("megatron_mhc.training", "megatron_mhc.hooks")):
        return 1
    if module.startswith("megatron_mhc.tools") or module == "megatron_mhc.__main__":
        return 2
    return 0  # megatron_mhc (root, _version), .core, .kernels, .patches


def _resolve(importer: str, node) -> list:
    """The project modules an import statement names."""
    targets = []
    if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = importer if MODULES[importer].name == "__init__.py" else importer.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{base}" if base else package
        for alias in node.names:
            candidate = f"{base}.{alias.name}"
            targets.append(candidate if candidate in MODULES else base)
    resolved = []
    for target in targets:
        while target and target not in MODULES:  # `import a.b.c` of a function/attribute path
            target = target.rpartition(".")[0]
        if target and target.startswith("megatron_mhc"):
            resolved.append(target)
    return resolved


def import_graph() -> dict:
    """``{module: {imported project modules}}`` over every import statement of the package."""
    graph = {}
    for module, path in MODULES.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges.update(t for t in _resolve(module, node) if t != module)
        graph[module] = edges
    return graph


def _cycles(graph: dict) -> list:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, result, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for succ in graph.get(node, ()):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                item = stack.pop()
                on_stack.discard(item)
                component.append(item)
                if item == node:
                    break
            if len(component) > 1:
                result.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return result


def test_the_three_floors_are_there():
    for package in ("megatron_mhc.core", "megatron_mhc.training", "megatron_mhc.tools",
                    "megatron_mhc.kernels", "megatron_mhc.patches"):
        assert package in MODULES, package
    for op_package in ("triton", "tilelang"):  # kernels/<language>/<op>.py
        assert (ROOT / "kernels" / op_package / "__init__.py").is_file(), op_package
    assert (ROOT / "patches" / "core_v0.19.0" / "megatron-mhc.patch").is_file()


def test_the_kernel_layout_table_names_every_op_module():
    """docs/performance.md's op -> module table names every module of ``kernels/triton/``,
    ``kernels/tilelang/`` and ``kernels/cuda/`` (one module per op)."""
    table = (ROOT / "docs" / "performance.md").read_text(encoding="utf-8")
    for language in ("triton", "tilelang", "cuda"):
        for path in sorted((ROOT / "kernels" / language).glob("*.py")):
            if path.name != "__init__.py":
                assert f"`kernels/{language}/{path.name}`" in table, path


def test_imports_only_go_downward():
    upward = [f"{a} ({FLOOR_NAMES[floor(a)]}) imports {b} ({FLOOR_NAMES[floor(b)]})"
              for a, targets in import_graph().items() for b in targets if floor(b) > floor(a)]
    assert not upward, "\n".join(upward)


def test_no_import_circle():
    assert _cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_planted_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_the_package_never_imports_tests():
    offenders = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{module}: {n}" for n in names
                          if n.split(".")[0] in ("tests", "fixtures", "dist_workers", "conftest")]
    assert not offenders


def test_no_symbolic_links_in_the_repository():
    try:
        listing = subprocess.run(["git", "ls-files", "-s"], cwd=ROOT, capture_output=True,
                                 text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    links = [line.split("\t", 1)[1] for line in listing.splitlines() if line.startswith("120000")]
    assert links == []
