"""Small intersphinx inventories for the external names our API reference mentions.

The documentation is built offline (CI and the development machines have no internet), so
the projects' own ``objects.inv`` cannot be downloaded, and no installed package ships one.
Instead this module lists, per project, the objects our docstrings and type hints refer to
and where each is documented on that project's site; :func:`write_inventories` writes a
standard (version 2, zlib-compressed) ``objects.inv`` per project, which ``conf.py`` hands to
``sphinx.ext.intersphinx`` as a local file with the project's real base URL. Links in the
built pages therefore point at the projects' documentation, and ``sphinx-build -n`` (nitpicky)
still fails on any reference that is in none of them: a new external name in a docstring
needs a line here (the error names it).

Set ``CELLFM_DOCS_ONLINE=1`` to use the projects' published inventories instead (needs the
network; a check that this table's pages exist).

Run ``python docs/_ext/inventories.py OUT_DIR`` to write the files by hand.
"""

from __future__ import annotations

import sys
import zlib
from pathlib import Path

#: project -> (base URL, {object name: (role, page relative to the base URL)})
#: role is the intersphinx domain:type ("py:class", "py:function", ...); a page with no "#"
#: gets "#<name>" appended (Sphinx's default anchors).
PROJECTS: dict[str, tuple[str, dict[str, tuple[str, str]]]] = {
    "python": (
        "https://docs.python.org/3/",
        {
            "os.PathLike": ("py:class", "library/os.html"),
            "pathlib.Path": ("py:class", "library/pathlib.html"),
            # unresolved string annotations (a signature that also names a type-checking-only
            # import) keep the bare name
            "Path": ("py:class", "library/pathlib.html#pathlib.Path"),
            "collections.abc.Sequence": ("py:class", "library/collections.abc.html"),
            "collections.abc.Iterable": ("py:class", "library/collections.abc.html"),
            "collections.abc.Iterator": ("py:class", "library/collections.abc.html"),
            "collections.abc.Mapping": ("py:class", "library/collections.abc.html"),
            "collections.abc.Callable": ("py:class", "library/collections.abc.html"),
            "typing.Any": ("py:data", "library/typing.html"),
            "typing.Literal": ("py:data", "library/typing.html"),
            "typing.IO": ("py:class", "library/typing.html"),
            "argparse.ArgumentParser": ("py:class", "library/argparse.html"),
            "argparse.Namespace": ("py:class", "library/argparse.html"),
            "int": ("py:class", "library/functions.html"),
            "float": ("py:class", "library/functions.html"),
            "str": ("py:class", "library/stdtypes.html"),
            "bool": ("py:class", "library/functions.html"),
            "bytes": ("py:class", "library/stdtypes.html"),
            "list": ("py:class", "library/stdtypes.html"),
            "tuple": ("py:class", "library/stdtypes.html"),
            "dict": ("py:class", "library/stdtypes.html"),
            "set": ("py:class", "library/stdtypes.html"),
            "frozenset": ("py:class", "library/stdtypes.html"),
            "object": ("py:class", "library/functions.html"),
            "type": ("py:class", "library/functions.html"),
            "slice": ("py:class", "library/functions.html"),
            "None": ("py:data", "library/constants.html"),
            "ValueError": ("py:exception", "library/exceptions.html"),
            "KeyError": ("py:exception", "library/exceptions.html"),
            "TypeError": ("py:exception", "library/exceptions.html"),
            "FileNotFoundError": ("py:exception", "library/exceptions.html"),
            "RuntimeError": ("py:exception", "library/exceptions.html"),
            "OSError": ("py:exception", "library/exceptions.html"),
            "UserWarning": ("py:exception", "library/exceptions.html"),
            "Exception": ("py:exception", "library/exceptions.html"),
        },
    ),
    "numpy": (
        "https://numpy.org/doc/stable/",
        {
            "numpy.ndarray": ("py:class", "reference/generated/numpy.ndarray.html"),
            "np.ndarray": ("py:class", "reference/generated/numpy.ndarray.html#numpy.ndarray"),
            "numpy.dtype": ("py:class", "reference/generated/numpy.dtype.html"),
            "numpy.random.Generator": ("py:class", "reference/random/generator.html"),
            "numpy.integer": ("py:class", "reference/arrays.scalars.html"),
            "numpy.floating": ("py:class", "reference/arrays.scalars.html"),
            "numpy.float32": ("py:attribute", "reference/arrays.scalars.html"),
            "numpy.int64": ("py:attribute", "reference/arrays.scalars.html"),
        },
    ),
    "scipy": (
        "https://docs.scipy.org/doc/scipy/",
        {
            "scipy.sparse.csr_matrix": (
                "py:class",
                "reference/generated/scipy.sparse.csr_matrix.html",
            ),
            # the runtime name of csr_matrix in annotations resolved by autodoc
            "scipy.sparse._csr.csr_matrix": (
                "py:class",
                "reference/generated/scipy.sparse.csr_matrix.html",
            ),
            "scipy.sparse.csc_matrix": (
                "py:class",
                "reference/generated/scipy.sparse.csc_matrix.html",
            ),
            "scipy.sparse.spmatrix": ("py:class", "reference/generated/scipy.sparse.spmatrix.html"),
            "scipy.stats.spearmanr": (
                "py:function",
                "reference/generated/scipy.stats.spearmanr.html",
            ),
        },
    ),
    "pandas": (
        "https://pandas.pydata.org/docs/",
        {
            "pandas.DataFrame": ("py:class", "reference/api/pandas.DataFrame.html"),
            "pandas.Series": ("py:class", "reference/api/pandas.Series.html"),
            "pandas.Index": ("py:class", "reference/api/pandas.Index.html"),
            # where autodoc finds them (type hints resolve to the defining module)
            "pandas.core.frame.DataFrame": (
                "py:class",
                "reference/api/pandas.DataFrame.html#pandas.DataFrame",
            ),
            "pandas.core.series.Series": (
                "py:class",
                "reference/api/pandas.Series.html#pandas.Series",
            ),
            "pandas.core.indexes.base.Index": (
                "py:class",
                "reference/api/pandas.Index.html#pandas.Index",
            ),
            "pd.DataFrame": ("py:class", "reference/api/pandas.DataFrame.html#pandas.DataFrame"),
            "pd.Series": ("py:class", "reference/api/pandas.Series.html#pandas.Series"),
            "pd.Index": ("py:class", "reference/api/pandas.Index.html#pandas.Index"),
            "pandas.Categorical": ("py:class", "reference/api/pandas.Categorical.html"),
            "pandas.core.arrays.categorical.Categorical": (
                "py:class",
                "reference/api/pandas.Categorical.html#pandas.Categorical",
            ),
            "pd.Categorical": (
                "py:class",
                "reference/api/pandas.Categorical.html#pandas.Categorical",
            ),
        },
    ),
    "torch": (
        "https://docs.pytorch.org/docs/stable/",
        {
            "torch.Tensor": ("py:class", "tensors.html"),
            "torch.device": ("py:class", "tensor_attributes.html"),
            "torch.dtype": ("py:class", "tensor_attributes.html"),
            "torch.Generator": ("py:class", "generated/torch.Generator.html"),
            "torch.nn.Module": ("py:class", "generated/torch.nn.Module.html"),
            "torch.nn.Module.state_dict": (
                "py:method",
                "generated/torch.nn.Module.html",
            ),
            "torch.nn.Module.load_state_dict": (
                "py:method",
                "generated/torch.nn.Module.html",
            ),
            "torch.nn.modules.module.Module": (
                "py:class",
                "generated/torch.nn.Module.html#torch.nn.Module",
            ),
            "torch.utils.data.dataloader.DataLoader": (
                "py:class",
                "data.html#torch.utils.data.DataLoader",
            ),
            "torch.nn.Parameter": ("py:class", "generated/torch.nn.parameter.Parameter.html"),
            "torch.compile": ("py:function", "generated/torch.compile.html"),
            "torch.load": ("py:function", "generated/torch.load.html"),
            "torch.save": ("py:function", "generated/torch.save.html"),
            "torch.utils.data.DataLoader": ("py:class", "data.html"),
            "torch.utils.data.Dataset": ("py:class", "data.html"),
            "torch.utils.data.Sampler": ("py:class", "data.html"),
        },
    ),
    "anndata": (
        "https://anndata.readthedocs.io/en/stable/",
        {
            "anndata.AnnData": ("py:class", "generated/anndata.AnnData.html"),
            "AnnData": ("py:class", "generated/anndata.AnnData.html#anndata.AnnData"),
            "anndata.read_h5ad": ("py:function", "generated/anndata.io.read_h5ad.html"),
            "anndata.io.read_h5ad": ("py:function", "generated/anndata.io.read_h5ad.html"),
        },
    ),
    "scanpy": (
        "https://scanpy.readthedocs.io/en/stable/",
        {
            "scanpy.pl.embedding": ("py:function", "generated/scanpy.pl.embedding.html"),
            "scanpy.pl.umap": ("py:function", "generated/scanpy.pl.umap.html"),
            "scanpy.pp.neighbors": ("py:function", "generated/scanpy.pp.neighbors.html"),
            "scanpy.pp.highly_variable_genes": (
                "py:function",
                "generated/scanpy.pp.highly_variable_genes.html",
            ),
            "scanpy.tl.umap": ("py:function", "generated/scanpy.tl.umap.html"),
        },
    ),
    "scvi": (
        "https://docs.scvi-tools.org/en/stable/",
        {
            "scvi.data.AnnDataManager": (
                "py:class",
                "api/reference/scvi.data.AnnDataManager.html",
            ),
            "scvi.model.base.BaseModelClass": (
                "py:class",
                "api/reference/scvi.model.base.BaseModelClass.html",
            ),
        },
    ),
    "lightning": (
        "https://lightning.ai/docs/pytorch/stable/",
        {
            "lightning.pytorch.LightningModule": (
                "py:class",
                "api/lightning.pytorch.core.LightningModule.html",
            ),
            "lightning.pytorch.LightningDataModule": (
                "py:class",
                "api/lightning.pytorch.core.LightningDataModule.html",
            ),
            "lightning.pytorch.Trainer": (
                "py:class",
                "api/lightning.pytorch.trainer.trainer.Trainer.html",
            ),
            "lightning.pytorch.Callback": (
                "py:class",
                "api/lightning.pytorch.callbacks.Callback.html",
            ),
            "lightning.pytorch.callbacks.Callback": (
                "py:class",
                "api/lightning.pytorch.callbacks.Callback.html",
            ),
            "lightning.pytorch.loggers.Logger": (
                "py:class",
                "api/lightning.pytorch.loggers.logger.Logger.html",
            ),
        },
    ),
    "matplotlib": (
        "https://matplotlib.org/stable/",
        {
            "matplotlib.figure.Figure": ("py:class", "api/_as_gen/matplotlib.figure.Figure.html"),
            "matplotlib.axes.Axes": ("py:class", "api/_as_gen/matplotlib.axes.Axes.html"),
            # plotting.py imports these names for type checking only, so autodoc sees the
            # bare names
            "Figure": (
                "py:class",
                "api/_as_gen/matplotlib.figure.Figure.html#matplotlib.figure.Figure",
            ),
            "Axes": ("py:class", "api/_as_gen/matplotlib.axes.Axes.html#matplotlib.axes.Axes"),
        },
    ),
}


def inventory_bytes(project: str, version: str = "") -> bytes:
    """One project's ``objects.inv`` (Sphinx inventory version 2)."""
    _base, objects = PROJECTS[project]
    header = (
        "# Sphinx inventory version 2\n"
        f"# Project: {project}\n"
        f"# Version: {version}\n"
        "# The remainder of this file is compressed using zlib.\n"
    ).encode()
    lines = []
    for name, (role, page) in sorted(objects.items()):
        uri = page if "#" in page else f"{page}#$"  # "$" = the object's name
        lines.append(f"{name} {role} 1 {uri} -\n")
    return header + zlib.compress("".join(lines).encode())


def write_inventories(out_dir: str | Path) -> dict[str, Path]:
    """Write ``<project>.inv`` for every project into ``out_dir`` (only when changed)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for project in PROJECTS:
        path = out / f"{project}.inv"
        data = inventory_bytes(project)
        if not path.exists() or path.read_bytes() != data:
            path.write_bytes(data)
        paths[project] = path
    return paths


if __name__ == "__main__":
    for name, path in write_inventories(sys.argv[1] if len(sys.argv) > 1 else ".").items():
        print(name, path)
