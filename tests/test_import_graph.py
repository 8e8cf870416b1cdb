"""The shape of ``src/``: no import cycle, no file over 600 lines, no function over 120 lines.

The import graph is read from the source (``ast``), not from ``sys.modules``, so it holds
every import a module can make: at module level, inside a function or a method, under
``TYPE_CHECKING``, relative (``from ..io import x``), and ``importlib.import_module("...")``
with a literal name. ``from pkg import name`` is an edge to the submodule ``pkg.name`` when
there is one, else to ``pkg``. An import of ``a.b.c`` is an edge to ``a.b.c`` only, not to
the packages ``a`` and ``a.b`` whose ``__init__`` runs first: counting those would make every
package that re-exports its submodules a cycle.

The allow-lists below name what is known to break a rule (empty since issue 20's part B).
A new offender fails, and so does an entry that no longer offends (remove it).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "cellfm_sc"
MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 120

KNOWN_CYCLES: set[frozenset[str]] = set()
KNOWN_LONG_FILES: set[str] = set()
KNOWN_LONG_FUNCTIONS: set[tuple[str, str]] = set()


# ---------------------------------------------------------------------------- the graph
@dataclass(frozen=True)
class Edge:
    """``source`` imports ``target`` at ``line`` of ``path``, inside ``scope``."""

    source: str
    target: str
    path: str
    line: int
    scope: str

    def __str__(self) -> str:
        return f"{self.source} -> {self.target} ({self.path}:{self.line}, {self.scope})"


def module_files(root: Path, package: str) -> dict[str, Path]:
    """Module name -> file, for every ``.py`` file of ``root/package`` (``__init__`` = package)."""
    out: dict[str, Path] = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _base(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module a ``from ... import`` reads from."""
    if not node.level:
        return node.module or ""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    parts = parts[: len(parts) - node.level + 1]
    return ".".join(parts + ([node.module] if node.module else []))


def _owner(name: str, modules: set[str]) -> str | None:
    """The longest prefix of the dotted ``name`` that is one of ``modules``."""
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        candidate = ".".join(parts[:k])
        if candidate in modules:
            return candidate
    return None


_IMPORTERS = ("import_module", "__import__")


def _targets(node: ast.AST, module: str, is_package: bool, modules: set[str]) -> list[str]:
    if isinstance(node, ast.Import):
        found = [_owner(alias.name, modules) for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = _base(node, module, is_package)
        found = [
            f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else _owner(base, modules)
            for alias in node.names
        ]
    elif isinstance(node, ast.Call):
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        arg = node.args[0] if node.args else None
        literal = isinstance(arg, ast.Constant) and isinstance(arg.value, str)
        found = [_owner(arg.value, modules)] if name in _IMPORTERS and literal else []
    else:
        found = []
    return [t for t in found if t is not None and t != module]


def import_edges(root: Path, package: str) -> list[Edge]:
    """Every import of one of the package's modules by another, with where it is made."""
    files = module_files(root, package)
    modules = set(files)
    edges: list[Edge] = []
    for module, path in files.items():
        is_package = path.name == "__init__.py"
        rel = str(path.relative_to(root))

        def visit(node: ast.AST, scope: list[str], module=module, rel=rel, pkg=is_package):
            for target in _targets(node, module, pkg, modules):
                edges.append(Edge(module, target, rel, node.lineno, ".".join(scope) or "<module>"))
            inner = scope
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                inner = [*scope, node.name]
            for child in ast.iter_child_nodes(node):
                visit(child, inner)

        visit(ast.parse(path.read_text(encoding="utf-8"), rel), [])
    return edges


def cycles(edges: list[Edge]) -> list[list[Edge]]:
    """One cycle (as its edges) per strongly connected component of more than one module."""
    graph: dict[str, dict[str, Edge]] = {}
    for e in edges:
        graph.setdefault(e.source, {}).setdefault(e.target, e)
        graph.setdefault(e.target, {})
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [_cycle_through(graph, comp) for comp in components]


def _cycle_through(graph: dict[str, dict[str, Edge]], component: set[str]) -> list[Edge]:
    """The shortest cycle through the first module of ``component`` (breadth first)."""
    start = min(component)
    paths: dict[str, list[Edge]] = {start: []}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w, edge in sorted(graph[v].items()):
            if w == start:
                return [*paths[v], edge]
            if w in component and w not in paths:
                paths[w] = [*paths[v], edge]
                queue.append(w)
    raise AssertionError(f"no cycle through {start} in {component}")  # pragma: no cover


def _describe(cycle: list[Edge]) -> str:
    return "\n    ".join(str(e) for e in cycle)


#: the layers, lowest first: a module imports from its own layer or one below (CONTRIBUTING.md)
LAYERS: list[set[str]] = [
    {"<root>", "_atomic", "_checkpoints", "_constants", "_errors", "_hardware", "_json", "_stores"},
    {"nn"},
    {"io"},
    {"vocab"},
    {"data"},
    {"pretrained", "metrics", "baselines"},
    {"dataloaders"},
    {"train"},
    {"model"},
    {"plotting", "report", "datasets"},
    {"cli"},
]
#: the one upward edge: ``CellFMTrunk.from_mindspore`` calls ``cellfm_sc.io.mapping.build_trunk``
UPWARD = {("cellfm_sc.nn.trunk", "cellfm_sc.io.mapping")}


def layer_of(module: str) -> int:
    """Index in :data:`LAYERS` of a ``cellfm_sc`` module (by its first component)."""
    head = module.split(".")[1] if "." in module else "<root>"
    found = [k for k, layer in enumerate(LAYERS) if head in layer]
    assert found, f"{module} is in no layer: add {head!r} to LAYERS (and CONTRIBUTING.md)"
    return found[0]


# ---------------------------------------------------------------------------- sizes
def _functions(tree: ast.AST, scope: list[str]) -> Iterator[tuple[str, int]]:
    """``(qualified name, lines)`` of every function, decorators and docstring included."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            yield ".".join([*scope, node.name]), node.end_lineno - first + 1
        inner = scope
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            inner = [*scope, node.name]
        yield from _functions(node, inner)


def long_files(root: Path) -> dict[str, int]:
    out = {}
    for path in sorted(root.rglob("*.py")):
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > MAX_FILE_LINES:
            out[path.relative_to(root).as_posix()] = n
    return out


def long_functions(root: Path) -> dict[tuple[str, str], int]:
    out = {}
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for name, n in _functions(tree, []):
            if n > MAX_FUNCTION_LINES:
                out[(path.relative_to(root).as_posix(), name)] = n
    return out


# ---------------------------------------------------------------------------- the rules
def test_src_has_no_import_cycle_but_the_known_ones():
    found = cycles(import_edges(SRC, PACKAGE))
    assert len(import_edges(SRC, PACKAGE)) > 100  # the scan sees the package's imports
    new = [c for c in found if frozenset(e.source for e in c) not in KNOWN_CYCLES]
    assert not new, "import cycle(s):\n    " + "\n\n    ".join(map(_describe, new))
    stale = KNOWN_CYCLES - {frozenset(e.source for e in c) for c in found}
    assert not stale, f"no longer a cycle, remove from KNOWN_CYCLES: {sorted(map(sorted, stale))}"


def test_no_file_in_src_over_600_lines_but_the_known_ones():
    found = long_files(SRC)
    new = {f: n for f, n in found.items() if f not in KNOWN_LONG_FILES}
    assert not new, f"files over {MAX_FILE_LINES} lines (split them by concept): {new}"
    stale = KNOWN_LONG_FILES - set(found)
    assert not stale, f"no longer over {MAX_FILE_LINES} lines, remove from the list: {stale}"


def test_no_function_in_src_over_120_lines_but_the_known_ones():
    found = long_functions(SRC)
    new = {k: n for k, n in found.items() if k not in KNOWN_LONG_FUNCTIONS}
    assert not new, f"functions over {MAX_FUNCTION_LINES} lines (split into named steps): {new}"
    stale = KNOWN_LONG_FUNCTIONS - set(found)
    assert not stale, f"no longer over {MAX_FUNCTION_LINES} lines, remove from the list: {stale}"


def test_imports_point_down_the_layers():
    edges = import_edges(SRC, PACKAGE)
    up = [
        str(e)
        for e in edges
        if layer_of(e.target) > layer_of(e.source) and (e.source, e.target) not in UPWARD
    ]
    assert not up, "imports from a higher layer:\n    " + "\n    ".join(up)
    assert {(e.source, e.target) for e in edges} >= UPWARD


def test_the_nn_trunk_io_mapping_cycle_stays_cut():
    edges = import_edges(SRC, PACKAGE)
    assert any(
        e.source == "cellfm_sc.nn.trunk" and e.target == "cellfm_sc.io.mapping" for e in edges
    ), "CellFMTrunk.from_mindspore's import of cellfm_sc.io.mapping is not seen"
    reach = {"cellfm_sc.io.mapping"}
    grew = True
    while grew:
        more = {e.target for e in edges if e.source in reach} - reach
        reach |= more
        grew = bool(more)
    assert "cellfm_sc.nn.trunk" not in reach


# ---------------------------------------------------------------------------- the scan itself
def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return tmp_path


@pytest.mark.parametrize(
    ("source", "target"),
    [
        ("import pkg.b\n", "pkg.b"),
        ("import pkg.b as bb\n", "pkg.b"),
        ("from pkg.b import f\n", "pkg.b"),
        ("from . import b\n", "pkg.b"),
        ("from .b import f\n", "pkg.b"),
        ("from pkg import b\n", "pkg.b"),
        ("from pkg import VERSION\n", "pkg"),
        ("from .sub.c import f\n", "pkg.sub.c"),
        ("from .sub import c\n", "pkg.sub.c"),
        ("def f():\n    from pkg.b import g\n", "pkg.b"),
        ("class C:\n    def m(self):\n        import pkg.b.x\n", "pkg.b"),
        ("if TYPE_CHECKING:\n    from pkg.b import T\n", "pkg.b"),
        ("import importlib\nimportlib.import_module('pkg.b')\n", "pkg.b"),
    ],
)
def test_the_scan_resolves_every_form_of_import(tmp_path, source, target):
    root = _tree(
        tmp_path,
        {"__init__.py": "", "a.py": source, "b.py": "", "sub/__init__.py": "", "sub/c.py": ""},
    )
    edges = [e for e in import_edges(root, "pkg") if e.source == "pkg.a"]
    assert [e.target for e in edges] == [target]


def test_relative_imports_of_a_package_init_resolve_from_the_package(tmp_path):
    root = _tree(tmp_path, {"__init__.py": "", "sub/__init__.py": "from .c import f\n"})
    (root / "pkg" / "sub" / "c.py").write_text("from .. import sub\n")
    targets = {(e.source, e.target) for e in import_edges(root, "pkg")}
    assert targets == {("pkg.sub", "pkg.sub.c"), ("pkg.sub.c", "pkg.sub")}


def test_a_function_level_import_closing_a_loop_is_a_cycle(tmp_path):
    root = _tree(
        tmp_path,
        {
            "__init__.py": "",
            "low.py": "def build():\n    from pkg.high import make\n    return make()\n",
            "high.py": "from pkg.mid import x\n",
            "mid.py": "from pkg.low import build\n",
            "other.py": "from pkg.low import build\n",
        },
    )
    found = cycles(import_edges(root, "pkg"))
    assert len(found) == 1
    assert [(e.source, e.target) for e in found[0]] == [
        ("pkg.high", "pkg.mid"),
        ("pkg.mid", "pkg.low"),
        ("pkg.low", "pkg.high"),
    ]
    assert found[0][-1].scope == "build" and found[0][-1].line == 2


def test_a_tree_without_loops_has_no_cycle(tmp_path):
    root = _tree(
        tmp_path,
        {"__init__.py": "from pkg.a import f\n", "a.py": "from pkg import b\n", "b.py": ""},
    )
    assert cycles(import_edges(root, "pkg")) == []


def test_the_size_scan_counts_decorators_docstrings_and_methods(tmp_path):
    body = [f"x{i} = {i}" for i in range(MAX_FUNCTION_LINES - 3)]
    short, deep = ("\n".join(pad + line for line in body) for pad in ("    ", "        "))
    text = (
        "import functools\n\n"
        f"@functools.cache\ndef long():\n    '''doc'''\n{short}\n    return 0\n\n"
        f"class C:\n    def ok(self):\n{deep}\n"
    )
    root = _tree(tmp_path, {"m.py": text})
    assert long_functions(root) == {("pkg/m.py", "long"): MAX_FUNCTION_LINES + 1}
    (root / "pkg" / "big.py").write_text("x = 1\n" * (MAX_FILE_LINES + 1))
    assert long_files(root) == {"pkg/big.py": MAX_FILE_LINES + 1}
