"""Sphinx configuration of the cellfm-sc documentation.

Build: ``sphinx-build -W --keep-going -b html docs docs/_build/html`` (``pip install -e ".[docs]"``).
The CLI reference is generated from :func:`cellfm_sc.cli.build_parser` at build time into
``docs/generated/cli_reference.md`` (git-ignored) and included by ``cli.md``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
os.environ.setdefault("MPLBACKEND", "Agg")

import cellfm_sc  # noqa: E402

project = "cellfm-sc"
author = "cellfm-sc developers"
copyright = "2026, cellfm-sc developers"
version = release = cellfm_sc.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
templates_path = ["_templates"]
exclude_patterns = ["_build", "generated/cli_reference.md", "Thumbs.db", ".DS_Store"]

myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

# autodoc / autosummary / napoleon (numpy-style docstrings)
autosummary_generate = True
autosummary_imported_members = False
autodoc_default_options = {"members": True, "inherited-members": False, "show-inheritance": False}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_preserve_defaults = True
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
napoleon_use_param = True

html_theme = "sphinx_book_theme"
html_title = "cellfm-sc"
html_theme_options = {
    "repository_url": "https://github.com/cellfm-sc/cellfm-sc",
    "use_repository_button": False,
    "show_toc_level": 2,
}


def _write_cli_reference() -> None:
    """Write the ``--help`` of every ``cellfm-sc`` command as MyST markdown."""
    import argparse

    from cellfm_sc.cli import build_parser

    old_columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "92"
    try:
        parser = build_parser()
        parts = ["## `cellfm-sc`", "", "```text", parser.format_help().rstrip(), "```", ""]
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    parts += [f"## `cellfm-sc {name}`", ""]
                    parts += ["```text", sub.format_help().rstrip(), "```", ""]
    finally:
        if old_columns is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old_columns
    target = HERE / "generated" / "cli_reference.md"
    target.parent.mkdir(exist_ok=True)
    text = "\n".join(parts)
    if not target.exists() or target.read_text(encoding="utf-8") != text:
        target.write_text(text, encoding="utf-8")


_write_cli_reference()
