"""The layering rules of the project, checked on the source (imports read with ``ast``, lazy ones too).

- ``clip_train`` and ``t2i`` never import each other; both may use ``training`` and ``caption_mixing``.
- ``eval`` knows nothing of training: no ``training``, ``clip_train``, ``t2i`` or ``experiments``.
- ``caption_mixing`` is the bottom library: it imports no other package of the project, except that its
  command line may start the testbed's.
- ``training`` serves both applications and imports neither.
- No import cycle between any two modules, and no function over 100 lines outside tests and benchmarks.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("caption_mixing", "testbed", "training", "clip_train", "t2i", "eval", "experiments")

FORBIDDEN = {
    "clip_train": {"t2i", "experiments"},
    "t2i": {"clip_train", "experiments"},
    "eval": {"training", "clip_train", "t2i", "experiments"},
    "training": {"clip_train", "t2i", "eval", "experiments", "testbed"},
    "caption_mixing": {"training", "clip_train", "t2i", "eval", "experiments"},
    "testbed": {"training", "clip_train", "t2i", "eval", "experiments"},
}
CLI_EXCEPTIONS = {("caption_mixing.__main__", "testbed")}  # `python -m caption_mixing testbed` delegates


def _module_files() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _imports(path: Path, module: str) -> set[str]:
    """Every project module this file imports, at top level or inside functions."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = module.split(".")[: -node.level] if not path.name == "__init__.py" else module.split(".")
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            found.add(name)
            found.update(f"{name}.{alias.name}" for alias in node.names)
    return {n for n in found if n.split(".")[0] in PACKAGES}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    files = _module_files()
    edges = {}
    for module, path in files.items():
        targets = set()
        for name in _imports(path, module):
            while name and name not in files:  # "pkg.mod.func" -> "pkg.mod"
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
        edges[module] = targets
    return edges


def test_packages_exist():
    for pkg in PACKAGES:
        assert (ROOT / pkg / "__init__.py").is_file(), f"{pkg}/ is not a package"


def test_forbidden_import_edges(graph):
    bad = []
    for module, targets in graph.items():
        top = module.split(".")[0]
        for target in targets:
            target_pkg = target.split(".")[0]
            if target_pkg in FORBIDDEN.get(top, set()) and (module, target_pkg) not in CLI_EXCEPTIONS:
                bad.append(f"{module} -> {target}")
    assert not bad, "layering violations:\n" + "\n".join(sorted(bad))


def test_no_import_cycles(graph):
    """Tarjan's strongly connected components: any component with two or more modules is a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            # a package's __init__ re-exporting its submodules is not a cycle of behaviour
            if w not in graph or w == v.rpartition(".")[0] or v == w.rpartition(".")[0]:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_no_function_over_100_lines():
    long = []
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    n = node.end_lineno - node.lineno + 1
                    if n > 100:
                        long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "functions over 100 lines:\n" + "\n".join(long)
