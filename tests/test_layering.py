"""The package layering (docs/architecture.md, "Packages and imports"), read from the source with `ast`:
every import of every module counts, inside functions too, so a lazy import cannot hide a dependency.

foundation imports nothing of ours; attacks only foundation; detector attacks and foundation; training
attacks, detector and foundation; serving detector and foundation, and attacks only in the demo
modules; safetynet (the CLI) any package. No two modules import each other, directly or through
others. And no source file outside tests/ is over 300 lines.
"""
from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
ALLOWED = {
    "foundation": set(),
    "attacks": {"foundation"},
    "detector": {"attacks", "foundation"},
    "training": {"attacks", "detector", "foundation"},
    "serving": {"detector", "foundation"},
    "safetynet": {"foundation", "attacks", "detector", "training", "serving"},
}
DEMO_MODULES = {"serving.demo": {"attacks"}, "serving.demo_engine": {"attacks"}}  # the epsilon demo attacks
MAX_LINES = 300


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for package in ALLOWED for path in sorted((ROOT / package).rglob("*.py"))}


def imports(module: str) -> Iterator[tuple[str, int]]:
    """(imported name, line) for every import statement in `module`, at any depth; `from X import Y`
    yields X and X.Y (Y may be a submodule), relative imports resolved."""
    path = MODULES[module]
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            yield base, node.lineno
            for alias in node.names:
                yield f"{base}.{alias.name}", node.lineno


def layer_violations() -> list[str]:
    """`file:line imports name` for each import of one of our packages that the rule forbids."""
    found: dict[tuple[str, int], str] = {}  # one entry per statement: the module it names
    for module, path in MODULES.items():
        package = module.split(".")[0]
        allowed = ALLOWED[package] | DEMO_MODULES.get(module, set()) | {package}
        for name, line in imports(module):
            key = (str(path.relative_to(ROOT)), line)
            if name.split(".")[0] in ALLOWED.keys() - allowed and len(name) < len(found.get(key, name + "_")):
                found[key] = name
    return [f"{file}:{line} imports {name}" for (file, line), name in sorted(found.items())]


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of ours it imports (a package's `__init__` is the package's name)."""
    return {module: {name for name, _ in imports(module) if name in MODULES and name != module} for module in MODULES}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        while work:
            node, successors = work[-1]
            step = next((s for s in successors if s not in index or s in stack), None)
            if step is not None and step not in index:
                index[step] = low[step] = len(index)
                stack.append(step)
                work.append((step, iter(sorted(graph[step]))))
                continue
            if step is not None:  # on the stack: a back edge
                low[node] = min(low[node], index[step])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while not component or component[-1] != node:
                    component.append(stack.pop())
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def long_files() -> list[str]:
    """`path: lines` for each source file outside tests/ (the packages, benchmarks/, the root) over
    MAX_LINES lines."""
    files = [*ROOT.glob("*.py"), *(path for folder in (*ALLOWED, "benchmarks") for path in (ROOT / folder).rglob("*.py"))]
    counts = {path.relative_to(ROOT): len(path.read_text().splitlines()) for path in files}
    return [f"{path}: {count}" for path, count in sorted(counts.items()) if count > MAX_LINES]


def test_every_package_is_read():
    for package in ALLOWED:
        assert package in MODULES, f"no {package}/__init__.py under {ROOT}"
    assert {"serving.demo", "serving.demo_engine"} <= set(MODULES)


def test_packages_import_only_the_layers_below():
    assert layer_violations() == []


def test_no_import_cycle_between_modules():
    assert cycles(import_graph()) == []


def test_cycle_finder_finds_a_cycle_through_three_modules():
    """The finder itself: a ring a -> b -> c -> a beside a chain, as a cycle the real graph could hold."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]


def test_no_source_file_outside_tests_is_over_300_lines():
    assert long_files() == []
