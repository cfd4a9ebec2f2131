"""Layering: no import cycle between lsskd's modules, function-level imports included.

Why modules, and why every import statement: a cycle A -> B -> A means neither module
can be read, tested or changed without the other, and which one is half-initialised
depends on who is imported first. Moving one side of it into a function body hides the
cycle from the interpreter, not from the design (this is how methods/kd -> deploy/load ->
engine/evaluation -> engine/trainer -> methods went unnoticed). So the graph below is
built from the source text: every ``import``/``from`` statement anywhere in a file (module
level, inside functions, under ``if TYPE_CHECKING``), relative imports resolved to lsskd
module names, one node per module (a package's ``__init__`` is the package's node). An
edge goes to the most specific module named (``from ..engine.profile import count_macs``
-> ``lsskd.engine.profile``; ``from .. import __version__`` -> ``lsskd``); the parent
packages Python initialises on the way are not edges, or every submodule would sit in a
cycle with the root package that imports it. Nothing is exempt.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

import lsskd

SRC = Path(lsskd.__file__).parent


def module_files(root: Path = SRC) -> Dict[str, Path]:
    """``{'lsskd.engine.trainer': path, 'lsskd.engine': .../engine/__init__.py, ...}``."""
    out = {}
    for f in sorted(root.rglob("*.py")):
        parts = list(f.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def imported_modules(name: str, path: Path, known: Set[str]) -> Set[str]:
    """The lsskd modules that ``name`` (the module in ``path``) imports anywhere."""
    is_pkg = path.name == "__init__.py"
    found: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: List[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                base = ".".join(pkg[:len(pkg) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # `from pkg import sub` imports the submodule; `from mod import name`, the module.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for t in targets:
            if t.split(".")[0] != "lsskd":
                continue
            while t not in known:  # `import lsskd.x.y` of a name inside a module
                t = t.rsplit(".", 1)[0]
            if t != name:
                found.add(t)
    return found


def import_graph(root: Path = SRC) -> Dict[str, Set[str]]:
    files = module_files(root)
    return {name: imported_modules(name, f, set(files)) for name, f in files.items()}


def find_cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """One cycle as ``[a, b, ..., a]``, or ``[]`` when the graph is acyclic (depth-first
    search; a node met again while still on the path closes a cycle)."""
    state: Dict[str, int] = {}  # 1: on the current path, 2: finished
    path: List[str] = []

    def visit(v: str) -> List[str]:
        state[v] = 1
        path.append(v)
        for w in sorted(graph.get(v, ())):
            if state.get(w) == 1:
                return path[path.index(w):] + [w]
            if w not in state:
                cyc = visit(w)
                if cyc:
                    return cyc
        path.pop()
        state[v] = 2
        return []

    for v in sorted(graph):
        if v not in state:
            cyc = visit(v)
            if cyc:
                return cyc
    return []


def test_the_graph_builder_sees_function_level_and_relative_imports(tmp_path):
    pkg = tmp_path / "lsskd"
    (pkg / "a").mkdir(parents=True)
    (pkg / "__init__.py").write_text("__version__ = '0'\n")
    (pkg / "a" / "__init__.py").write_text("from .x import f\n")
    (pkg / "a" / "x.py").write_text("def f():\n    from ..b import g\n    return g\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                              "    from lsskd.a.x import f\nfrom . import __version__\nimport os\n")
    g = import_graph(pkg)
    assert g == {"lsskd": set(), "lsskd.a": {"lsskd.a.x"}, "lsskd.a.x": {"lsskd.b"},
                 "lsskd.b": {"lsskd.a.x", "lsskd"}}
    assert find_cycle(g) == ["lsskd.a.x", "lsskd.b", "lsskd.a.x"]
    g["lsskd.b"].discard("lsskd.a.x")
    assert find_cycle(g) == []


def test_no_import_cycle_between_lsskd_modules():
    graph = import_graph()
    assert len(graph) > 60 and "lsskd.engine.trainer" in graph["lsskd.commands.train"]
    assert find_cycle(graph) == []


def test_errors_are_imported_from_the_errors_module():
    """Every user-facing error is defined in lsskd.errors and imported from there, not
    through a module that happens to import it (docs included)."""
    from lsskd import errors

    names = {n for n in vars(errors) if n.endswith("Error")}
    bad = []
    for name, f in module_files().items():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and not (node.module or "").endswith("errors"):
                bad += [f"{name}:{node.lineno} {a.name} from {node.module}"
                        for a in node.names if a.name in names]
    docs = SRC.parents[1] / "docs"
    for f in sorted(docs.glob("*.md")) if docs.is_dir() else []:
        for i, line in enumerate(f.read_text().splitlines(), 1):
            if line.lstrip().startswith("from lsskd.") and "errors import" not in line and any(
                    n in line.split(" import ", 1)[-1].replace(",", " ").split() for n in names):
                bad.append(f"{f.name}:{i} {line.strip()}")
    assert bad == []
