"""Sphinx configuration of the cellfm-sc documentation.

Build: ``sphinx-build -n -W --keep-going -b html docs docs/_build/html``
(``pip install -e ".[docs]"``); offline, in well under a minute.

``docs/cli.md`` carries the command reference (committed, so the repository's web view shows
it); ``docs/make_cli_reference.py`` rewrites its generated part here when it is stale.

Generated at build time into ``docs/generated/`` (git-ignored):

- ``benchmark_summary.md``: the decision table that leads the benchmarks page, read from
  ``benchmarks/RESULTS.md`` by ``docs/_ext/bench_summary.py`` (so the page's numbers are the
  benchmarks');
- ``inventories/*.inv``: intersphinx inventories for the external names we link to
  (``docs/_ext/inventories.py``: the build has no internet; see that module).

The API reference lists cellfm-sc's own members only: ``_skip_foreign`` drops members a class
inherits from scvi-tools, PyTorch or Python (they are documented there).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE / "_ext"))
sys.path.insert(0, str(HERE))
os.environ.setdefault("MPLBACKEND", "Agg")

import make_cli_reference  # noqa: E402
from bench_summary import write_benchmark_summary  # noqa: E402
from inventories import PROJECTS, write_inventories  # noqa: E402

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
    "sphinx.ext.intersphinx",
    "sphinx_copybutton",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
templates_path = ["_templates"]
exclude_patterns = [
    "_build",
    "_ext",
    "generated/benchmark_summary.md",
    "generated/sea_ad_epoch.md",
    "generated/benchmark_reading.md",
    "generated/shift_transfer.md",
    "tutorials/sea_ad_example/*.md",
    "Thumbs.db",
    ".DS_Store",
]
nitpicky = True
# the page's table of contents names members without their class and module
toc_object_entries_show_parents = "hide"
nitpick_ignore = [
    # the return type of ``load``, a classmethod of the base every model class shares: it
    # returns the class it is called on (documented there), the base itself is internal
    ("py:class", "cellfm_sc.model.base._model.CellFMModel"),
    ("py:class", "CellFMModel"),
    # torch.Generator's runtime name in signatures (not in torch's inventory)
    ("py:class", "torch._C.Generator"),
]


myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

# autodoc / autosummary / napoleon (numpy-style docstrings)
autosummary_generate = True
autosummary_imported_members = False
autodoc_default_options = {"members": True}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_preserve_defaults = True
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
napoleon_use_param = True

# intersphinx from local inventories (offline; see docs/_ext/inventories.py)
_INV = write_inventories(HERE / "generated" / "inventories")
if os.environ.get("CELLFM_DOCS_ONLINE") == "1":
    intersphinx_mapping = {name: (base, None) for name, (base, _) in PROJECTS.items()}
else:
    intersphinx_mapping = {name: (base, str(_INV[name])) for name, (base, _) in PROJECTS.items()}
# numpy-style types stay as written (``np.ndarray``); the Python domain links them, and the
# inventories carry the short spellings (np., pd.) beside the full names
napoleon_preprocess_types = False

copybutton_prompt_text = r"\$ |>>> |\.\.\. "
copybutton_prompt_is_regexp = True
copybutton_only_copy_prompt_lines = False

html_theme = "sphinx_book_theme"
html_title = "cellfm-sc"
html_theme_options = {
    "repository_url": "https://github.com/cellfm-sc/cellfm-sc",
    "use_repository_button": False,
    "show_toc_level": 2,
}
html_static_path = ["_static"]
html_css_files = ["custom.css"]


make_cli_reference.write()  # docs/cli.md's generated part, if stale
write_benchmark_summary(HERE.parent / "benchmarks" / "RESULTS.md", HERE / "generated")


def _foreign_names() -> frozenset[str]:
    """Member names of the foreign base classes our classes inherit from."""
    import torch
    from scvi.model.base import BaseModelClass

    names: set[str] = set()
    for base in (*BaseModelClass.__mro__, *torch.nn.Module.__mro__, BaseException, object):
        names.update(vars(base))
        names.update(getattr(base, "__annotations__", {}))
    return frozenset(names)


_FOREIGN = _foreign_names()


def _owner_module(obj: object) -> str | None:
    for attr in ("fget", "__func__", "func"):
        obj = getattr(obj, attr, obj)
    module = getattr(obj, "__module__", None)
    return module if isinstance(module, str) else None


def _skip_foreign(app, what, name, obj, skip, options):
    """Skip class members that come from scvi-tools, PyTorch or Python (not ours).

    autodoc passes ``what="class"``, autosummary the member's own type; both are handled.
    """
    if skip:
        return None
    module = _owner_module(obj)
    if module is not None and module.split(".")[0] == "cellfm_sc":
        return None
    if module is not None and (callable(obj) or isinstance(obj, property)):
        return True
    if name in _FOREIGN:
        return True
    return None


def setup(app):
    app.connect("autodoc-skip-member", _skip_foreign)
