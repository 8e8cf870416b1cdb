"""Layering: ``cellfm_sc.nn`` imports nothing of ours (DESIGN.md section 3).

The exceptions: the façade ``CellFMTrunk.from_mindspore``, which imports
``cellfm_sc.io.mapping`` when called (see its docstring for why), and
``cellfm_sc._constants``, the package's leaf of shared choice lists (it imports nothing), which
sits below every layer. Every other import of a
``cellfm_sc`` module outside ``cellfm_sc.nn`` -- at module level, inside a function, under
``TYPE_CHECKING``, relative, or through ``importlib`` -- fails this test.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

NN = Path(__file__).resolve().parents[1] / "src" / "cellfm_sc" / "nn"
ALLOWED = {("trunk.py", "CellFMTrunk.from_mindspore", "cellfm_sc.io.mapping")}


def _resolve(node: ast.ImportFrom, package: str) -> str:
    if not node.level:
        return node.module or ""
    parts = package.split(".")
    base = parts[: len(parts) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


#: leaf modules below every layer (they import nothing of ours)
LEAVES = ("cellfm_sc._constants",)


def _is_ours_outside_nn(target: str) -> bool:
    return (
        (target == "cellfm_sc" or target.startswith("cellfm_sc."))
        and not (target == "cellfm_sc.nn" or target.startswith("cellfm_sc.nn."))
        and target not in LEAVES
    )


def scan(source: str, filename: str, package: str = "cellfm_sc.nn") -> set[tuple[str, str, str]]:
    """``(file, enclosing function, imported module)`` for every import of ours outside nn."""
    found: set[tuple[str, str, str]] = set()

    def visit(node: ast.AST, scope: list[str]) -> None:
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = _resolve(node, package)
            # ``from cellfm_sc import io`` imports the submodule cellfm_sc.io
            targets = [f"{mod}.{a.name}" if mod == "cellfm_sc" else mod for a in node.names]
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__") and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    targets = [arg.value if not arg.value.startswith(".") else "cellfm_sc"]
        for t in targets:
            if _is_ours_outside_nn(t):
                found.add((filename, ".".join(scope) or "<module>", t))
        inner = scope
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            inner = [*scope, node.name]
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(ast.parse(source, filename), [])
    return found


def test_nn_imports_nothing_of_ours_but_the_documented_facade():
    files = sorted(NN.rglob("*.py"))
    assert {"trunk.py", "layers.py", "config.py"} <= {f.name for f in files}
    found: set[tuple[str, str, str]] = set()
    for f in files:
        found |= scan(f.read_text(encoding="utf-8"), str(f.relative_to(NN)))
    assert found == ALLOWED


@pytest.mark.parametrize(
    ("source", "where", "target"),
    [
        ("import cellfm_sc.io\n", "<module>", "cellfm_sc.io"),
        ("from cellfm_sc.vocab import GeneVocab\n", "<module>", "cellfm_sc.vocab"),
        ("def f():\n    from cellfm_sc.data import TokenBatch\n", "f", "cellfm_sc.data"),
        ("class C:\n    def m(self):\n        import cellfm_sc.model\n", "C.m", "cellfm_sc.model"),
        ("from .. import cli\n", "<module>", "cellfm_sc.cli"),
        ("from ..io.mapping import x\n", "<module>", "cellfm_sc.io.mapping"),
        ("from cellfm_sc import io\n", "<module>", "cellfm_sc.io"),
        ("import cellfm_sc\n", "<module>", "cellfm_sc"),
        (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from cellfm_sc.io import X\n",
            "<module>",
            "cellfm_sc.io",
        ),
        ("import importlib\nimportlib.import_module('cellfm_sc.io')\n", "<module>", "cellfm_sc.io"),
    ],
)
def test_the_scan_catches_every_form_of_import(source, where, target):
    assert scan(source, "x.py") == {("x.py", where, target)}


def test_the_scan_ignores_nn_and_third_party_imports():
    source = "from .config import CellFMConfig\nimport cellfm_sc.nn.layers\nimport torch\n"
    assert scan(source, "x.py") == set()


def test_importing_and_running_nn_loads_no_other_layer():
    code = (
        "import sys, torch\n"
        "from cellfm_sc.nn import CellFMConfig, CellFMTrunk, apply_trainable\n"
        "t = CellFMTrunk(CellFMConfig.from_preset('tiny'), n_genes=10)\n"
        "t(torch.rand(2, 3), torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.bool))\n"
        "apply_trainable(t, 'all', trunk_prefix='')\n"
        "print(sorted(m for m in sys.modules if m.startswith('cellfm_sc')"
        " and not m.startswith('cellfm_sc.nn')))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(NN.parents[1])}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.strip() == "['cellfm_sc', 'cellfm_sc._constants']"
