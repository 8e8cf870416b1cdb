"""The :class:`~cellfm_sc.nn.CellFMTrunk` as a MindSpore checkpoint: build one, export one.

Above both :mod:`cellfm_sc.nn.trunk` (the module) and :mod:`cellfm_sc.io.mapping` (names,
config and state), so neither imports the other's layer in a cycle.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cellfm_sc.io._values import DEFAULT_MAX_ABS
from cellfm_sc.io.checkpoint import write_mindspore_checkpoint
from cellfm_sc.io.mapping import NUM_HEADS_ENTRY, LoadReport, build_trunk, to_mindspore_name
from cellfm_sc.nn.trunk import CellFMTrunk

__all__ = ["save_trunk_mindspore", "trunk_from_mindspore"]


def trunk_from_mindspore(
    path: str | Path,
    num_heads: int | None = None,
    max_abs: float | None = DEFAULT_MAX_ABS,
    **overrides: Any,
) -> tuple[CellFMTrunk, LoadReport]:
    """Read a ``.ckpt`` and build the matching trunk with every parameter loaded.

    ``cellfm_sc.io.mapping.build_trunk`` with :class:`~cellfm_sc.nn.CellFMTrunk`.

    Parameters
    ----------
    path
        MindSpore checkpoint (variants A, A', B; optimizer entries are skipped).
    num_heads
        Retention heads; cannot be read from shapes, defaults to the checkpoint's recorded
        ``num_heads`` entry (``stored_num_heads``), else to 48 only for
        ``enc_dims == 1536``.
    max_abs
        Refuse a model tensor with ``|value| > max_abs`` (``None``: no magnitude check);
        NaN/inf are always refused. See :func:`~cellfm_sc.io.check_state_values`.
    **overrides
        :class:`~cellfm_sc.nn.CellFMConfig` fields to override (e.g. ``dropout``).

    Returns
    -------
    ``(trunk, report)``; ``trunk.gene_emb`` keeps the checkpoint's ``(rows, enc_dims)``
    table and ``trunk.load_report`` is ``report``.

    Raises
    ------
    CheckpointError
        Unreadable file, or a tensor with NaN/inf or ``|value| > max_abs``.
    ValueError
        Missing parameter or disagreeing shape (naming it and both shapes).

    Examples
    --------
    >>> trunk, report = trunk_from_mindspore("CellFM_80M_weight.ckpt")  # doctest: +SKIP
    >>> print(report)  # doctest: +SKIP
    CellFM checkpoint load: variant A (public MindSpore CellFM)
    """
    return build_trunk(CellFMTrunk, path, num_heads=num_heads, max_abs=max_abs, **overrides)


def save_trunk_mindspore(
    trunk: CellFMTrunk,
    path: str | os.PathLike[str],
    *,
    crc: bool = False,
    record_num_heads: bool = False,
) -> None:
    """Write ``trunk`` as a variant-A MindSpore ``.ckpt`` (what the original code loads).

    Every parameter is written, float32, under its MindSpore name (``to_mindspore_name``:
    LayerNorm ``weight/bias`` -> ``gamma/beta``; everything else keeps its name), in the
    order MindSpore's ``parameters_and_names`` lists them for the CellFM class:
    ``gene_emb (rows, D)``, ``cls_token``, ``zero_emb``, ``value_enc.mask_emb``,
    ``value_enc.value_enc.{a, w1, w3, table}``, ``encoder.{i}.*``, ``value_dec.*``,
    ``cellwise_dec.*`` (golden manifests ``manifest_80M_*.json``). A trunk without
    ``zero_emb``/decoders gives the annotation Backbone's set (variant A'), a variant-B trunk
    adds ``ST_emb``/``ST_enc.*``. :func:`~cellfm_sc.io.trunk_from_mindspore` reads the file
    back into an identical trunk (``num_heads`` must be given unless ``enc_dims == 1536`` or the
    file records it, see ``record_num_heads``).

    Parameters
    ----------
    trunk
        The trunk (any device/dtype; values are copied to CPU float32 as written).
    path
        Destination, written atomically (:func:`~cellfm_sc.io.write_mindspore_checkpoint`).
    crc
        Append MindSpore's ``crc_num`` trailer.
    record_num_heads
        Also write the integer entry ``num_heads`` (``NUM_HEADS_ENTRY``, after the
        parameters), so that readers need no ``num_heads=`` for a trunk of another width than
        the released 1536 (``stored_num_heads``). MindSpore's ``load_param_into_net``
        leaves it unloaded, as it does the ``epoch_num`` entries of ``append_dict``.

    Raises
    ------
    ValueError
        If the trunk's parameters are not those of a plain :class:`~cellfm_sc.nn.CellFMTrunk` of its config
        (e.g. LoRA adapters still attached: merge them first), naming the differences.

    Examples
    --------
    >>> save_trunk_mindspore(trunk, "pretrained.ckpt")  # doctest: +SKIP
    >>> trunk2, report = trunk_from_mindspore("pretrained.ckpt", num_heads=4)  # doctest: +SKIP
    """
    own = dict(trunk.named_parameters())
    with torch.device("meta"):  # the expected names and shapes, without allocating
        ref = CellFMTrunk(trunk.config, n_genes=trunk.n_genes, emb_rows=trunk.emb_rows)
    expected = {k: tuple(p.shape) for k, p in ref.named_parameters()}
    unexpected = [k for k in own if k not in expected]
    missing = [k for k in expected if k not in own]
    wrong = [
        f"{k} {tuple(p.shape)} vs {expected[k]}"
        for k, p in own.items()
        if k in expected and tuple(p.shape) != expected[k]
    ]
    if unexpected or missing or wrong:
        parts = [
            f"{what}: {items[:6]}"
            for what, items in (
                ("not trunk parameters (LoRA adapters? merge them first)", unexpected),
                ("missing", missing),
                ("shape differs from the config's (found vs expected)", wrong),
            )
            if items
        ]
        raise ValueError(
            "cannot export the trunk as a MindSpore checkpoint; its parameters are not those "
            f"of a CellFMTrunk with its config: {'; '.join(parts)}"
        )
    tensors = {
        to_mindspore_name(name): param.detach().to(device="cpu", dtype=torch.float32)
        for name, param in own.items()
    }
    if record_num_heads:
        tensors[NUM_HEADS_ENTRY] = np.asarray(int(trunk.config.num_heads), dtype=np.int64)
    write_mindspore_checkpoint(path, tensors, crc=crc)
