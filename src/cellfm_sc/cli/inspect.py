"""``cellfm-sc inspect``: what a MindSpore CellFM checkpoint holds."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cellfm_sc.cli._args import Command, add_shared
from cellfm_sc.cli._console import CLIError, Console
from cellfm_sc.cli._files import existing_file

__all__ = ["COMMAND", "run"]


def _add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CKPT", help="MindSpore .ckpt file")
    add_shared(
        p,
        "--num-heads",
        help="retention heads (cannot be read from shapes; default: the number the checkpoint "
        "records (cellfm-sc's exports), else 48 for 1536-wide released models)",
    )
    p.add_argument("--json", action="store_true", help="print the facts as JSON instead of tables")


def _fmt_shape(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")" if len(shape) != 1 else f"({shape[0]},)"


def _mb(nbytes: int) -> float:
    return nbytes / 1e6


def _skip_groups(names: Sequence[str]) -> list[tuple[str, int]]:
    """Group skipped names as ``moment1.*`` (count) where a prefix repeats."""
    groups: dict[str, int] = {}
    for name in names:
        head = name.split(".", 1)[0] + ".*" if "." in name else name
        groups[head] = groups.get(head, 0) + 1
    return list(groups.items())


#: the checkpoint variants (``cellfm_sc.io.detect_variant``), as ``inspect`` describes them
_VARIANTS = {
    "A": "public MindSpore CellFM (zero_emb, value and cellwise decoders)",
    "A'": "CellFM annotation Backbone (no zero_emb, no decoders)",
    "B": "CellFM with ST tokens (public PyTorch port's checkpoints)",
}


def run(args: argparse.Namespace, con: Console) -> int:
    path = existing_file(args.checkpoint, "checkpoint")
    from cellfm_sc.io import CheckpointError, read_mindspore_checkpoint

    try:
        state = read_mindspore_checkpoint(path)
    except CheckpointError as exc:
        raise CLIError(f"not a readable MindSpore checkpoint: {exc}") from exc
    facts, heads_txt = _facts(path, state, args.num_heads)
    if args.json:
        con.result(json.dumps(facts, indent=2))
    else:
        _print_facts(facts, heads_txt, con)
    if facts["values_problem"]:  # a data error (exit 2): a load would refuse its values
        raise CLIError(f"a load refuses this checkpoint: {facts['values_problem']}")
    return 0


def _facts(path: Path, state: dict[str, Any], num_heads: int | None) -> tuple[dict[str, Any], str]:
    """What ``inspect`` reports on a read checkpoint (its ``--json``), and the heads line."""
    from cellfm_sc.io import CheckpointError
    from cellfm_sc.io.mapping import (
        check_state_values,
        detect_variant,
        infer_config,
        split_state,
        stored_num_heads,
    )

    model, skipped, prefix = split_state(state)
    variant = detect_variant(model)
    if "gene_emb" not in model or not any(k.startswith("encoder.") for k in model):
        shown = ", ".join(list(model)[:5])
        raise CLIError(
            f"{path} is a MindSpore checkpoint but not a CellFM one: no gene_emb / encoder.* "
            f"parameters (first names: {shown})"
        )
    dims = int(model["gene_emb"].shape[1])
    try:
        stored = stored_num_heads(state)
        heads_known = num_heads is not None or stored is not None or dims == 1536
        heads = num_heads or stored or (48 if dims == 1536 else 1)
        config, rows = infer_config(model, num_heads=heads, stored_heads=stored)
    except ValueError as exc:
        raise CLIError(str(exc)) from exc

    # names in file order, MindSpore spelling
    model_src = [k for k in state if k not in set(skipped)]
    params = [
        {
            "name": name,
            "dtype": str(state[name].dtype),
            "shape": [int(s) for s in state[name].shape],
            "mb": _mb(int(state[name].nbytes)),
        }
        for name in model_src
    ]
    facts: dict[str, Any] = {
        "file": str(path),
        "file_mb": _mb(path.stat().st_size),
        "variant": variant,
        "variant_description": _VARIANTS[variant],
        "config": {
            "enc_dims": config.enc_dims,
            "n_layers": config.n_layers,
            "num_heads": config.num_heads if heads_known else None,
            "head_dim": config.head_dim if heads_known else None,
            "value_bins": config.value_bins,
            "zero_emb": config.zero_emb,
            "decoders": config.decoders,
            "zero_logit": config.zero_logit,
            "st_tokens": config.st_tokens,
        },
        "gene_emb_rows": rows,
        "vocabulary_size_max": rows - 1,
        "wrapper_prefix": prefix,
        "n_parameters": len(params),
        "n_values": sum(int(state[k].size) for k in model_src),
        "parameters_mb": _mb(sum(int(state[k].nbytes) for k in model_src)),
        "parameters": params,
        "skipped": list(skipped),
        "skipped_mb": _mb(sum(int(state[k].nbytes) for k in skipped)),
    }
    try:  # the values a load would refuse (non-finite, or beyond max_abs)
        check_state_values(model, source=path)
        facts["values_problem"] = None
    except CheckpointError as exc:
        facts["values_problem"] = str(exc)
    c = facts["config"]
    heads_how = (
        ""
        if num_heads is not None
        else ", recorded in the checkpoint"
        if stored is not None
        else ", assumed for a released 1536-wide model"
    )
    heads_txt = (
        f"{c['num_heads']} (head dim {c['head_dim']}){heads_how}"
        if heads_known
        else "unknown: pass --num-heads (cannot be read from the shapes)"
    )
    return facts, heads_txt


def _print_facts(facts: dict[str, Any], heads_txt: str, con: Console) -> None:
    """The text form of ``inspect``: the config, one line per parameter, what a load skips."""
    c, rows, params = facts["config"], facts["gene_emb_rows"], facts["parameters"]
    lines = [
        f"file:        {facts['file']} ({facts['file_mb']:.2f} MB)",
        f"variant:     {facts['variant']}: {facts['variant_description']}",
        "config:",
        f"  enc_dims   {c['enc_dims']}",
        f"  n_layers   {c['n_layers']}",
        f"  num_heads  {heads_txt}",
        f"  value_bins {c['value_bins']}",
        f"  zero_emb {c['zero_emb']}, decoders {c['decoders']}, zero_logit {c['zero_logit']}, "
        f"ST tokens {c['st_tokens']}",
        f"gene_emb:    {rows} rows x {c['enc_dims']} (a vocabulary of up to {rows - 1} genes; "
        "fine-tuning replaces this table with one for your genes)",
    ]
    if facts["wrapper_prefix"]:
        lines.append(f"wrapper prefix stripped on load: {facts['wrapper_prefix']!r}")
    con.result("\n".join(lines))
    con.result()
    width = max([len(p["name"]) for p in params] + [4])
    shapes = [_fmt_shape(p["shape"]) for p in params]
    swidth = max([len(s) for s in shapes] + [5])
    con.result(f"{'name':<{width}}  {'dtype':<8}  {'shape':<{swidth}}  {'MB':>9}")
    con.result(f"{'-' * width}  {'-' * 8}  {'-' * swidth}  {'-' * 9}")
    for p, shape in zip(params, shapes):
        con.result(f"{p['name']:<{width}}  {p['dtype']:<8}  {shape:<{swidth}}  {p['mb']:>9.3f}")
    con.result(
        f"{len(params)} parameters, {facts['n_values']:,} values, {facts['parameters_mb']:.2f} MB"
    )
    con.result()
    skipped = facts["skipped"]
    if skipped:
        groups = ", ".join(f"{g} ({n})" if n > 1 else g for g, n in _skip_groups(skipped))
        con.result(
            f"a load would skip {len(skipped)} optimizer/bookkeeping entries "
            f"({facts['skipped_mb']:.2f} MB): {groups}"
        )
    else:
        con.result("a load would skip 0 entries (no optimizer state or bookkeeping)")


COMMAND = Command(
    "inspect",
    "show what a MindSpore CellFM checkpoint holds",
    "Show a MindSpore CellFM checkpoint's variant (A: public MindSpore CellFM, "
    "A': annotation Backbone, B: with ST tokens), the configuration read from its "
    "shapes, a table of its parameters, and the optimizer/bookkeeping entries a load "
    "would skip. Reads the file with cellfm-sc's own parser (no MindSpore, nothing "
    "unpickled).",
    _add_options,
    run,
)
