"""The documentation says what the code does: outputs shown on pages are the code's outputs.

- ``docs/demo_output.txt`` (quick start, SEA-AD tutorial) is what ``cellfm-sc demo --quiet``
  prints, apart from the run time and the report's absolute path;
- the SEA-AD tutorial's example outputs are what ``docs/tutorials/make_sea_ad_example.py``
  makes;
- benchmark figures on the pages come from ``benchmarks/RESULTS.md`` through generated
  snippets, and no page types a metric, throughput or memory figure by hand;
- names used as ``cellfm_sc.<name>`` in the pages' code exist.

Regenerate with ``python docs/make_demo_output.py`` and
``python docs/tutorials/make_sea_ad_example.py``.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import zlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
EXAMPLE = DOCS / "tutorials" / "sea_ad_example"


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _pages() -> list[Path]:
    pages = sorted(DOCS.glob("*.md")) + sorted((DOCS / "tutorials").glob("*.md"))
    return [p for p in pages if "generated" not in p.parts]


# --------------------------------------------------------------------------------------------
# the demo's output
# --------------------------------------------------------------------------------------------


def test_pages_show_the_committed_demo_output():
    for page in ("quickstart.md", "tutorials/sea_ad_adnc.md"):
        text = (DOCS / page).read_text(encoding="utf-8")
        assert re.search(r"literalinclude\}\s+(\.\./)?demo_output\.txt", text) or (
            page.startswith("tutorials") and "sea_ad_example/" in text
        ), page
    shown = (DOCS / "demo_output.txt").read_text(encoding="utf-8")
    accuracy = re.search(r"demo accuracy \(test cells\): (\d\.\d+)", shown).group(1)
    # the README quotes the demo's accuracy: the same number
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    quoted = re.findall(r"accuracy (\d\.\d+) on the held-out", readme)
    assert quoted and all(q == accuracy for q in quoted), (quoted, accuracy)


def test_demo_pins_the_cpu_kernels():
    """The demo's figures are the same on every x86-64 CPU: its kernels are pinned before
    torch is imported (what the README and docs say, and why their figure holds)."""
    import subprocess

    code = (
        "import os, sys\n"
        "from cellfm_sc.cli.demo import REPRODUCIBLE_CPU, pin_cpu_kernels\n"
        "assert pin_cpu_kernels()\n"
        "import torch\n"
        "print(torch.backends.cpu.get_cpu_capability(), os.environ['MKL_CBWR'])\n"
        "print(pin_cpu_kernels())\n"  # too late now: torch is imported
    )
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["DEFAULT", "COMPATIBLE", "False"]
    quick = (DOCS / "quickstart.md").read_text(encoding="utf-8")
    assert "ATEN_CPU_CAPABILITY=default" in quick and "MKL_CBWR=COMPATIBLE" in quick


@pytest.mark.slow
def test_demo_prints_what_the_docs_show(tmp_path):
    """Fails when the demo's printed output and docs/demo_output.txt disagree."""
    pytest.importorskip("cellfm_sc.model")
    make = _load(DOCS / "make_demo_output.py", "make_demo_output")
    printed = make.run_demo(tmp_path)
    shown = (DOCS / "demo_output.txt").read_text(encoding="utf-8")
    command, _, shown_output = shown.partition("\n")
    assert command == "$ cellfm-sc " + " ".join(make.COMMAND)
    assert make.normalise(printed) == make.normalise(shown_output), (
        "cellfm-sc demo prints something else than docs/demo_output.txt shows; "
        "run python docs/make_demo_output.py"
    )


# --------------------------------------------------------------------------------------------
# the command line reference
# --------------------------------------------------------------------------------------------


def test_cli_page_is_in_the_tree_and_current():
    """docs/cli.md holds the reference itself (the repository's web view shows it), and it
    is what docs/make_cli_reference.py makes from the parser now."""
    make = _load(DOCS / "make_cli_reference.py", "make_cli_reference")
    page = (DOCS / "cli.md").read_text(encoding="utf-8")
    assert "{include}" not in page and make.MARKER in page
    assert make.page(page) == page, "docs/cli.md is stale: run python docs/make_cli_reference.py"
    for command in ("inspect", "finetune", "pretrain", "predict", "embed", "demo"):
        assert f"## `cellfm-sc {command}`" in page
    for flag in ("--labels-key COLUMN", "--keep-checkpoints N", "--progress", "--accelerator"):
        assert f"`{flag}" in page, flag


# --------------------------------------------------------------------------------------------
# the SEA-AD tutorial's example outputs
# --------------------------------------------------------------------------------------------


def test_tutorial_shows_the_generated_example_outputs():
    page = (DOCS / "tutorials" / "sea_ad_adnc.md").read_text(encoding="utf-8")
    for name in ("python_output.txt", "cli_output.txt", "confusion_matrix.png", "umap.png"):
        assert (EXAMPLE / name).is_file(), name
        assert f"sea_ad_example/{name}" in page, name
    python_output = (EXAMPLE / "python_output.txt").read_text(encoding="utf-8")
    assert "qwk" in python_output and "n_donors" in python_output  # donor-level metrics
    assert "donor" in python_output.splitlines()[-9]  # the donor table follows
    assert "sea_ad_epoch.md" in page  # time and memory per epoch: generated


@pytest.mark.slow
def test_example_outputs_are_the_scripts(tmp_path):
    """Fails when make_sea_ad_example.py makes other outputs than the committed ones."""
    pytest.importorskip("cellfm_sc.model")
    make = _load(DOCS / "tutorials" / "make_sea_ad_example.py", "make_sea_ad_example")
    make.run_pinned(tmp_path)  # a fresh process: the CPU kernels pinned before torch loads
    for name in ("python_output.txt", "cli_output.txt"):
        got = (tmp_path / name).read_text(encoding="utf-8")
        shown = (EXAMPLE / name).read_text(encoding="utf-8")
        assert make.normalise(got) == make.normalise(shown), (
            f"{name} differs; run python docs/tutorials/make_sea_ad_example.py"
        )
    got = (tmp_path / "donor_predictions.csv").read_text(encoding="utf-8")
    assert got == (EXAMPLE / "donor_predictions.csv").read_text(encoding="utf-8")


# --------------------------------------------------------------------------------------------
# benchmark figures
# --------------------------------------------------------------------------------------------


def test_benchmark_snippets_come_from_results(tmp_path):
    bench = _load(DOCS / "_ext" / "bench_summary.py", "bench_summary")
    results = (REPO / "benchmarks" / "RESULTS.md").read_text(encoding="utf-8")
    rows = bench.gpu_rows(results)
    default = next(
        r for r in rows if (r["preset"], r["precision"], r["batch"]) == ("80M", "bf16-mixed", "16")
    )
    # the figures are RESULTS.md's own
    assert f"| {default['cells_s']} |" in results
    assert default["peak"] in results
    # and what the epoch time is derived from
    cells_s = float(default["cells_s"].replace(",", ""))
    minutes = bench.SEA_AD_NUCLEI / cells_s / 60
    assert default["epoch"] == f"{round(minutes)} min"
    bench.write_benchmark_summary(REPO / "benchmarks" / "RESULTS.md", tmp_path)
    epoch = (tmp_path / "sea_ad_epoch.md").read_text(encoding="utf-8")
    assert default["epoch"] in epoch and default["peak"] in epoch
    assert "benchmark_summary.md" in (DOCS / "benchmarks.md").read_text(encoding="utf-8")


#: figures a page must not type by hand (they belong in generated snippets)
HAND_TYPED = re.compile(r"\b\d+(\.\d+)? ?GiB\b|\bcells/s\b|\baccuracy \d\.\d+|\b0\.\d{3,4}\b")


@pytest.mark.parametrize("page", _pages(), ids=lambda p: p.name)
def test_pages_type_no_figures_by_hand(page):
    text = page.read_text(encoding="utf-8")
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # code: expected values in examples
    hits = [m.group(0) for m in HAND_TYPED.finditer(text)]
    assert not hits, f"{page.name} quotes {hits}: quote them from a generated snippet"


def test_pages_code_uses_existing_names():
    import cellfm_sc

    used: set[str] = set()
    for page in [*_pages(), REPO / "README.md"]:
        for block in re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), re.S):
            used |= set(re.findall(r"\bcellfm_sc\.([a-z_]+)\b", block))
    assert used, "no cellfm_sc.<name> found in the pages' Python code"
    missing = sorted(n for n in used if not hasattr(cellfm_sc, n))
    assert not missing, f"pages use cellfm_sc.{missing}, which do not exist"


# --------------------------------------------------------------------------------------------
# the pages and the docstrings name no file outside the documentation
# --------------------------------------------------------------------------------------------

#: files a reader of the built documentation cannot open: the developers' notes, the shared
#: data of the development machines, the test files, the contributors' guide
REPO_ONLY = re.compile(
    r"DESIGN\.md|STYLE\.md|CONTRIBUTING\.md|\.\./shared\b|\bshared/data\b|\btests/test_\w+\.py"
)
#: in a docstring also the benchmark log: the benchmarks page shows it
REPO_ONLY_IN_DOCSTRINGS = re.compile(REPO_ONLY.pattern + r"|RESULTS\.md")


@pytest.mark.parametrize("page", _pages(), ids=lambda p: p.name)
def test_pages_name_no_file_outside_the_documentation(page):
    hits = REPO_ONLY.findall(page.read_text(encoding="utf-8"))
    assert not hits, f"{page.name} names {hits}, which the documentation does not contain"


def _docstring_hits(source: str) -> list[str]:
    import ast

    tree = ast.parse(source)
    kinds = ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef
    docs = [ast.get_docstring(n) or "" for n in ast.walk(tree) if isinstance(n, kinds)]
    return [m.group(0) for d in docs for m in REPO_ONLY_IN_DOCSTRINGS.finditer(d)]


def test_docstrings_name_no_file_outside_the_documentation():
    src = REPO / "src"
    found = {}
    for path in sorted(src.rglob("*.py")):
        hits = _docstring_hits(path.read_text(encoding="utf-8"))
        if hits:
            found[path.relative_to(src).as_posix()] = hits
    assert not found, (
        f"docstrings (rendered by autodoc) name files outside the documentation: {found}"
    )


def test_the_docstring_scan_sees_every_kind_of_docstring():
    source = (
        '"""See DESIGN.md."""\n'
        'class C:\n    """Data in ../shared/data."""\n'
        '    def m(self):\n        """Numbers in benchmarks/RESULTS.md."""\n'
        'def f():\n    """tests/test_x.py checks it."""\n'
    )
    found = sorted(_docstring_hits(source))
    assert found == ["../shared", "DESIGN.md", "RESULTS.md", "tests/test_x.py"]


# --------------------------------------------------------------------------------------------
# the offline intersphinx inventories
# --------------------------------------------------------------------------------------------


def test_inventories_are_valid(tmp_path):
    inv = _load(DOCS / "_ext" / "inventories.py", "inventories")
    paths = inv.write_inventories(tmp_path)
    assert set(paths) >= {
        "python", "numpy", "scipy", "pandas", "torch", "anndata", "scanpy", "scvi", "lightning",
    }  # fmt: skip
    for name, path in paths.items():
        head, _, body = path.read_bytes().partition(b"zlib.\n")
        assert head.startswith(b"# Sphinx inventory version 2\n")
        lines = zlib.decompress(body).decode().splitlines()
        assert len(lines) == len(inv.PROJECTS[name][1])
        for line in lines:
            _name, role, prio, uri, _ = line.split(" ")
            assert role.count(":") == 1 and prio == "1" and ".html" in uri, line
    sphinx_inventory = pytest.importorskip("sphinx.util.inventory")
    data = sphinx_inventory.InventoryFile.loads(
        paths["numpy"].read_bytes(), uri=inv.PROJECTS["numpy"][0]
    )
    entry = data.data["py:class"]["numpy.ndarray"] if hasattr(data, "data") else None
    if entry is None:
        entry = data["py:class"]["numpy.ndarray"]
    uri = entry.uri if hasattr(entry, "uri") else entry[2]
    assert uri.endswith("reference/generated/numpy.ndarray.html#numpy.ndarray")
